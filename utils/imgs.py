"""Image files in and out: any image file as RGB, [0, 1] images to uint8 arrays, PNG files (written atomically), grids."""
import io
import os
import struct
from typing import Optional, Tuple

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from utils.ckpt import write_bytes_atomic

__all__ = ['IMAGE_READ_ERRORS', 'load_rgb', 'to_rgb', 'resize_short_side', 'crop_square', 'centre_crop_square', 'hflip', 'to_tensor01',
           'to_uint8_BHW3', 'save_png_atomic', 'make_grid', 'save_grid']

WHITE = (255, 255, 255)
# what reading a damaged, truncated, oversized or unsupported image file raises (PIL's plugins use all of these)
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, PIL.Image.DecompressionBombError)
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def load_rgb(path: str, background: Tuple[int, int, int] = WHITE) -> PIL.Image.Image:
    """The image of a file as 8-bit RGB, as a viewer shows it (the one loader of the data sets and edit.py).

    EXIF orientation is applied; transparent pixels are composited over `background` (white: how the
    image looks on a page). Raises OSError / ValueError (with the file's name) for an unreadable file
    or a mode with no defined RGB meaning.
    """
    with PIL.Image.open(path) as img:
        img.load()
        try:
            return to_rgb(PIL.ImageOps.exif_transpose(img), background)
        except ValueError as e:
            raise ValueError(f'{path}: {e}') from None


def to_rgb(img: PIL.Image.Image, background: Tuple[int, int, int] = WHITE) -> PIL.Image.Image:
    """Any PIL mode → 8-bit RGB: 16-bit and 32-bit integer grey scaled from [0, 65535] (not clipped at 255),
    LAB through a colour profile, palette / alpha / colour-key transparency composited over `background`."""
    if img.mode == 'F':
        raise ValueError('32-bit float images (mode F) have no standard value range; save the image as 8 or 16-bit')
    if img.mode in SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_8bit(img)
    elif img.mode == 'LAB':
        from PIL import ImageCms
        lab_to_srgb = ImageCms.buildTransform(ImageCms.createProfile('LAB'), ImageCms.createProfile('sRGB'), 'LAB', 'RGB')
        img = ImageCms.applyTransform(img, lab_to_srgb)
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
        rgba = img.convert('RGBA')
        return PIL.Image.alpha_composite(PIL.Image.new('RGBA', rgba.size, (*background, 255)), rgba).convert('RGB')
    return img if img.mode == 'RGB' else img.convert('RGB')


def _sixteen_bit_to_8bit(img: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit grey (modes I;16*, and I as PNG and TIFF readers use it) → L, or LA when a colour key marks transparency."""
    v_hw = np.asarray(img).astype(np.int64)
    if v_hw.min() < 0 or v_hw.max() > 65535:
        raise ValueError(f'integer image (mode {img.mode}) with values from {v_hw.min()} to {v_hw.max()}, outside the 16-bit range [0, 65535]')
    l_hw = ((v_hw * 255 + 32767) // 65535).astype(np.uint8)       # round(v / 257)
    key = img.info.get('transparency')
    if isinstance(key, int):
        alpha_hw = np.where(v_hw == key, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(np.stack([l_hw, alpha_hw], axis=-1))   # LA
    return PIL.Image.fromarray(l_hw)   # L


# The data transforms, on PIL images, pixel for pixel as torchvision.transforms.functional computes them (the reference's
# pipeline; tests/test_image_io.py compares the two) without importing torchvision, which every script would pay for at start.
def resize_short_side(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """The short side to `size`, the long one int(size * long / short), Lanczos (TF.resize(img, size, LANCZOS))."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), PIL.Image.LANCZOS)


def crop_square(img: PIL.Image.Image, top: int, left: int, r: int) -> PIL.Image.Image:
    """The r x r square at (top, left) (TF.crop(img, top, left, r, r))."""
    return img.crop((left, top, left + r, top + r))


def centre_crop_square(img: PIL.Image.Image, r: int) -> PIL.Image.Image:
    """The centre r x r square, its offsets rounded as TF.center_crop rounds them; the image must be at least r x r."""
    w, h = img.size
    if r > w or r > h:
        raise ValueError(f'a {r}x{r} centre crop of a {w}x{h} image')
    if (w, h) == (r, r):
        return img
    return crop_square(img, int(round((h - r) / 2.0)), int(round((w - r) / 2.0)), r)


def hflip(img: PIL.Image.Image) -> PIL.Image.Image:
    return img.transpose(PIL.Image.FLIP_LEFT_RIGHT)


def to_tensor01(img: PIL.Image.Image) -> torch.Tensor:
    """(C, H, W) float in [0, 1] of an 8-bit image (RGB or L), as TF.to_tensor gives it."""
    if img.mode not in ('RGB', 'L'):
        raise ValueError(f'to_tensor01 takes RGB or L images, not {img.mode}')
    arr = np.array(img, dtype=np.uint8, copy=True)
    t = torch.from_numpy(arr).view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).contiguous()
    return t.to(dtype=torch.get_default_dtype()).div(255)


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
