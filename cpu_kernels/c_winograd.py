"""3×3 convolutions by this package's C kernel (csrc/winograd_conv3x3.c): Winograd's F(4×4, 3×3), float32, AVX-512.

NNPACK's F(6×6, 3×3) (winograd.py), which PyTorch ships, does its products with AVX2 code and reads NCHW. This
kernel does them with AVX-512 register blocks, 36 products per tile of 4×4 outputs (1/4 of the direct conv's
multiply-adds), keeps each block of tiles in L2 from input transform to output, and reads and writes channels-last,
the tokenizer's layout on the CPU. Results differ from the direct conv by float rounding: ~1e-5 of the output's
largest value, as NNPACK's.

The layer before the conv can be read into it: a nearest ×2 upsampling (the decoder's Upsample2x: upsample.py), or
a GroupNorm and SiLU (the ResnetBlock's: winograd.norm_silu_conv3x3), the norm's statistics gathered in one pass
first. Neither is then made in memory: the upsampled or normalised activation is never written out and read back.

It runs where the CPU's rule chooses Winograd (cpu_rules.py), the CPU has AVX-512 and it could be built
(native.py); elsewhere winograd.py calls NNPACK. Letters: B batch, C/O input/output channels, h/w height/width,
P the 36 positions of a 6×6 tile.
"""
import ctypes
import functools
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .cpu_rules import read_cpu_features

from . import native

__all__ = ['C_KERNEL', 'status', 'usable', 'conv3x3']

C_KERNEL = 'winograd_conv3x3'   # csrc/winograd_conv3x3.c


@functools.lru_cache(maxsize=None)
def _has_avx512() -> bool:
    """Whether this machine's CPU (read once, never a rule's assumption) runs AVX-512F code."""
    return 'avx512f' in read_cpu_features().flags


@functools.lru_cache(maxsize=None)
def _kernels():
    """(weights, conv, channel sums) with their ctypes signatures, or None where the library cannot be built (native.py)."""
    lib, _ = native.library(C_KERNEL)
    if lib is None:
        return None
    weights, conv, sums = lib.winograd_weights, lib.winograd_conv3x3, lib.channel_sums
    weights.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2                 # c range, C, O, g, U
    conv.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5   # tiles, H, W, C, O, x, up, scale, shift, U, bias, y
    sums.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2                    # row range, W, C, x, sums
    weights.restype = conv.restype = sums.restype = ctypes.c_int
    return weights, conv, sums


def status() -> str:
    """'' where the kernel can run here, else why not (no AVX-512, or why it could not be built)."""
    if not _has_avx512():
        return 'this CPU has no AVX-512'
    return '' if _kernels() is not None else native.library(C_KERNEL)[1]


def usable(in_channels: int, out_channels: int) -> bool:
    """Whether the kernel may compute a conv of these widths here (multiples of 16: its vectors), the CPU's rule having
    chosen Winograd (the caller checked it, and float32 CPU inference)."""
    return in_channels % 16 == 0 and out_channels % 16 == 0 and not status()


def _pointer(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _group_norm_affine(x_BhwC: torch.Tensor, norm: nn.GroupNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (B, C) float32, with norm(x) = scale · x + shift per image and channel: the group statistics
    summed in double by the kernel, the variance biased and eps inside the root, as nn.GroupNorm."""
    B, C, h, w = x_BhwC.shape
    G = norm.num_groups
    sums_R2C = torch.empty(B * h, 2, C, dtype=torch.float64)
    native.run_split(_kernels()[2], B * h, (w, C, x_BhwC.data_ptr(), sums_R2C.data_ptr()))
    sums_B2G = sums_R2C.view(B, h, 2, C).sum(1).view(B, 2, G, C // G).sum(-1)
    n = C // G * h * w
    mean_BG = sums_B2G[:, 0] / n
    rstd_BG = (sums_B2G[:, 1] / n - mean_BG * mean_BG).clamp_(min=0).add_(norm.eps).rsqrt_()
    scale_BC = rstd_BG.repeat_interleave(C // G, dim=1)
    if norm.affine:
        scale_BC = scale_BC * norm.weight.detach().double()
    shift_BC = -mean_BG.repeat_interleave(C // G, dim=1) * scale_BC
    if norm.affine:
        shift_BC = shift_BC + norm.bias.detach().double()
    return scale_BC.float().contiguous(), shift_BC.float().contiguous()


def conv3x3(x_BChw: torch.Tensor, weight_OC33: torch.Tensor, bias_O: torch.Tensor = None, *, upsample: bool = False,
            norm: Optional[nn.GroupNorm] = None) -> torch.Tensor:
    """F.conv2d(a(x), weight, bias, padding=1) for float32 CPU tensors without autograd, returned channels-last (the
    input is read channels-last: a copy where it is not). a(x) = x; with `upsample`, x nearest-upsampled ×2 (the output
    is 2h × 2w); with `norm`, F.silu(norm(x)) (norm: the GroupNorm before the conv). Neither is made in memory."""
    B, C, h, w = x_BChw.shape
    O = weight_OC33.shape[0]
    if weight_OC33.shape != (O, C, 3, 3) or (bias_O is not None and bias_O.shape != (O,)):
        raise ValueError(f'conv3x3 takes (O, {C}, 3, 3) weights and (O,) bias for a {tuple(x_BChw.shape)} input, got '
                         f'{tuple(weight_OC33.shape)} and {None if bias_O is None else tuple(bias_O.shape)}')
    if norm is not None and (norm.num_channels != C or C % norm.num_groups):
        raise ValueError(f'conv3x3 takes a GroupNorm of the input\'s {C} channels, got {norm}')
    weights, conv, _ = _kernels()
    x_BhwC = x_BChw.contiguous(memory_format=torch.channels_last)
    scale_BC, shift_BC = _group_norm_affine(x_BhwC, norm) if norm is not None else (None, None)
    if upsample:
        h, w = 2 * h, 2 * w
    g_C9O = weight_OC33.permute(1, 2, 3, 0).contiguous()
    U_PCO = x_BChw.new_empty(36, C, O)
    native.run_split(weights, C, (C, O, g_C9O.data_ptr(), U_PCO.data_ptr()))
    bias_O = bias_O.detach().contiguous() if bias_O is not None else None
    y_BOhw = torch.empty((B, O, h, w), dtype=x_BChw.dtype, memory_format=torch.channels_last)
    tiles = B * ((h + 3) // 4) * ((w + 3) // 4)
    native.run_split(conv, tiles, (h, w, C, O, x_BhwC.data_ptr(), int(upsample), _pointer(scale_BC), _pointer(shift_BC),
                                   U_PCO.data_ptr(), _pointer(bias_O), y_BOhw.data_ptr()))
    return y_BOhw
