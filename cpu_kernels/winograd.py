"""3×3 convolutions of CPU inference by Winograd's minimal filtering: this package's F(4×4, 3×3) (c_winograd.py) where
the CPU has AVX-512, else NNPACK's F(6×6, 3×3).

A direct 3×3 conv spends 9 multiply-adds per output and channel pair. Winograd's F(6×6, 3×3) gets a 6×6
output tile from an 8×8 input tile with 64 products, 1.78 per output, plus cheap tile transforms. PyTorch
ships NNPACK, which implements it, but calls it only for batches of 16 images or more and never before
oneDNN. One image at a time it beats oneDNN's direct conv on the tokenizer's wide, large layers (160 channels
at 256², 320 at 64²) and loses on small maps (640 channels at 16²) and narrow layers (32 channels at 128²), hence
the thresholds below. This package's C kernel (c_winograd.py) does its products in AVX-512 code where NNPACK's are
AVX2, keeping each block of tiles in L2; it reads and writes channels-last.

The result differs from a direct conv by float rounding only, about 2e-5 of the output's scale (the
transforms add and subtract before multiplying): decoded images move by ~5e-5, far inside the reference
data's 1e-3 image tolerance. The reference path is `conv.conv2d(x, weight, bias, padding=1)` (the direct conv).

Letters: B batch, C/O input/output channels, h/w height/width.
"""
import functools
import logging
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import c_winograd
from .choices import cpu_rule
from .conv import Conv2d, conv2d
from .narrow_conv import conv3x3_by_taps, taps_apply
from .switch import SWITCH, plain_cpu_float32

__all__ = ['Conv3x3', 'conv3x3', 'norm_silu_conv3x3', 'conv3x3_uses_winograd', 'conv3x3_uses_c_kernel', 'winograd_conv3x3', 'winograd_applies', 'winograd_pays',
           'nnpack_available', 'winograd_reads_channels_last', 'WINOGRAD_MIN_HW', 'WINOGRAD_MIN_CHANNELS']

logger = logging.getLogger(__name__)

WINOGRAD_MIN_HW = 64 * 64        # feature maps of at least this many positions (no gain at 32², a loss at 16²)
WINOGRAD_MIN_CHANNELS = 128      # and at least this many input and output channels (a loss at 32 and 64)


_failure = {'error': None}   # set by the first NNPACK call that fails: the direct conv from then on


@functools.lru_cache(maxsize=None)
def _nnpack_initialised() -> bool:
    try:
        return bool(torch._nnpack_available())
    except (AttributeError, RuntimeError):
        return False


def nnpack_available() -> bool:
    """Whether this PyTorch build has NNPACK and it runs on this CPU (the first call initialises it)."""
    return _failure['error'] is None and _nnpack_initialised()


def winograd_applies(x: torch.Tensor) -> bool:
    """Whether `x` may go through the Winograd path: float32 on the CPU, autograd, autocast and torch.compile off, chosen
    for this CPU (choices.py), this package's kernel or NNPACK there."""
    return (plain_cpu_float32(x) and not torch.is_grad_enabled() and cpu_rule().winograd
            and (not c_winograd.status() or nnpack_available()))


def winograd_reads_channels_last() -> bool:
    """Whether the Winograd convs here read channels-last (this package's kernel) rather than NCHW (NNPACK)."""
    return not c_winograd.status()


def winograd_pays(in_channels: int, out_channels: int, h: int, w: int) -> bool:
    """Whether a 3×3 conv of this size is faster by Winograd than by oneDNN's direct conv (the thresholds above)."""
    return min(in_channels, out_channels) >= WINOGRAD_MIN_CHANNELS and h * w >= WINOGRAD_MIN_HW


def winograd_conv3x3(x_BChw: torch.Tensor, weight_OC33: torch.Tensor, bias_O: torch.Tensor = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) by Winograd: this package's kernel (channels-last) where it runs, else
    NNPACK's, one image at a time (its fast inference path).

    Give NNPACK one image where you can (VQVAE decodes and encodes image by image on the CPU): a batch costs
    a copy of the output to put the images together.
    """
    if c_winograd.usable(weight_OC33.shape[1], weight_OC33.shape[0]):
        return c_winograd.conv3x3(x_BChw, weight_OC33, bias_O)
    if not nnpack_available():
        return F.conv2d(x_BChw, weight_OC33, bias_O, padding=1)
    x_BChw, weight_OC33 = x_BChw.contiguous(), weight_OC33.contiguous()
    try:
        if x_BChw.shape[0] == 1:
            return torch._nnpack_spatial_convolution(x_BChw, weight_OC33, bias_O, [1, 1])
        return torch.cat([torch._nnpack_spatial_convolution(x_1Chw, weight_OC33, bias_O, [1, 1]) for x_1Chw in x_BChw.split(1)])
    except RuntimeError as e:   # NNPACK refused (a CPU or size it does not handle): say so once, then convolve directly
        _failure['error'] = str(e)
        logger.warning('NNPACK Winograd conv failed (%s) for input %s; using the direct conv from now on',
                       e, tuple(x_BChw.shape))
        return F.conv2d(x_BChw, weight_OC33, bias_O, padding=1)


def conv3x3_uses_c_kernel(x_BChw: torch.Tensor, in_channels: int, out_channels: int, h: int, w: int) -> bool:
    """Whether a 3×3 conv of `x` (h×w: its size) goes by Winograd through this package's kernel, which can also read
    the layer before it (a GroupNorm + SiLU, a ×2 upsampling) into its input."""
    return conv3x3_uses_winograd(x_BChw, in_channels, out_channels, h, w) and c_winograd.usable(in_channels, out_channels)


def conv3x3_uses_winograd(x_BChw: torch.Tensor, in_channels: int, out_channels: int, h: int, w: int) -> bool:
    """Whether a 3×3 conv of `x` (h×w: its size) goes by Winograd."""
    return SWITCH.on and winograd_pays(in_channels, out_channels, h, w) and winograd_applies(x_BChw)


def conv3x3(x_BChw: torch.Tensor, weight_OC33: torch.Tensor, bias_O: torch.Tensor = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1): by Winograd where it pays and applies, by taps for a few output channels
    (narrow_conv.py), else the batch-invariant direct conv."""
    O, C, h, w = weight_OC33.shape[0], weight_OC33.shape[1], x_BChw.shape[-2], x_BChw.shape[-1]
    if conv3x3_uses_winograd(x_BChw, C, O, h, w):
        return winograd_conv3x3(x_BChw, weight_OC33, bias_O)
    if taps_apply(x_BChw, C, O):
        return conv3x3_by_taps(x_BChw, weight_OC33, bias_O)
    return conv2d(x_BChw, weight_OC33, bias_O, padding=(1, 1))


def norm_silu_conv3x3(x_BChw: torch.Tensor, norm: nn.GroupNorm, conv: 'Conv3x3', dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """conv(dropout(silu(norm(x)))), the step of the tokenizer's ResnetBlock. Where the conv goes by this package's
    Winograd kernel (and dropout does nothing), in one pass: the kernel normalises and applies SiLU as it reads its
    input, so neither is made in memory (c_winograd.py). Otherwise the three ops, SiLU in place without autograd."""
    O, C, h, w = conv.weight.shape[0], conv.weight.shape[1], x_BChw.shape[-2], x_BChw.shape[-1]
    dropout_off = (dropout is None or isinstance(dropout, nn.Identity)
                   or (isinstance(dropout, nn.Dropout) and (not dropout.training or dropout.p == 0)))
    if dropout_off and isinstance(norm, nn.GroupNorm) and conv3x3_uses_c_kernel(x_BChw, C, O, h, w):
        return c_winograd.conv3x3(x_BChw, conv.weight, conv.bias, norm=norm)
    h_BChw = F.silu(norm(x_BChw), inplace=not torch.is_grad_enabled())
    return conv(dropout(h_BChw) if dropout is not None else h_BChw)


class Conv3x3(Conv2d):
    """nn.Conv2d(in, out, 3, stride=1, padding=1), same parameters and checkpoint keys, computed by `conv3x3`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return conv3x3(x_BChw, self.weight, self.bias)
