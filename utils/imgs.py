"""Images in [0, 1] to uint8 arrays, PNG files (written atomically) and grids."""
import io
import os
from typing import Optional

import numpy as np
import PIL.Image
import torch

from utils.ckpt import write_bytes_atomic

__all__ = ['to_uint8_BHW3', 'save_png_atomic', 'make_grid', 'save_grid']


def to_uint8_BHW3(img_B3HW: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] → (B, H, W, 3) uint8 (rounded to nearest)."""
    return img_B3HW.detach().float().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png_atomic(arr_HW3: np.ndarray, path: str) -> None:
    """Write a PNG under a temporary name, fsync and rename it, so neither a kill nor a power loss leaves a partial file."""
    buf = io.BytesIO()
    PIL.Image.fromarray(arr_HW3).save(buf, format='PNG')
    write_bytes_atomic(buf.getvalue(), path)


def make_grid(img_B3HW: torch.Tensor, nrow: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile B images row by row, `nrow` per row, into one (H', W', 3) uint8 array."""
    arr = to_uint8_BHW3(img_B3HW)
    B, H, W, _ = arr.shape
    rows = (B + nrow - 1) // nrow
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, 3), pad_value, dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = arr[i]
    return grid


def save_grid(img_B3HW: torch.Tensor, nrow: int, path: str, scale: Optional[int] = None) -> str:
    grid = make_grid(img_B3HW, nrow)
    if scale and scale > 1:
        grid = np.asarray(PIL.Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), PIL.Image.NEAREST))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png_atomic(grid, path)
    return path
