"""3×3 convs with a handful of output channels (the tokenizer decoder's conv_out to RGB) in CPU inference, by taps.

oneDNN's direct conv runs such a layer (160 → 3 channels) far below its usual rate. The same sum, taken tap by tap:
one matrix product of the 9·O tap weights with the input, (9·O, C) @ (C, h·w), as wide as the image, then the nine
(O, h, w) planes added at their shifts. It sums over channels first and over taps second, so it rounds differently
from the direct conv, by about as much as the direct conv rounds (both ~2e-6 off a float64 conv). Image by image, so
an image's result does not depend on its batch (see conv.py).

Letters: B batch, C/O input/output channels, h/w height/width, T the nine taps (ky, kx).
"""
from typing import Optional

import torch

from .switch import SWITCH, plain_cpu_float32

__all__ = ['NARROW_MAX_OUT_CHANNELS', 'NARROW_MIN_IN_CHANNELS', 'conv3x3_by_taps', 'taps_apply']

NARROW_MAX_OUT_CHANNELS = 4   # RGB out; a wider output is a plain conv, at oneDNN's usual rate
NARROW_MIN_IN_CHANNELS = 32


def taps_apply(x_BChw: torch.Tensor, in_channels: int, out_channels: int) -> bool:
    """Whether a 3×3 conv (stride 1, padding 1) of `x` goes by taps: few outputs from many inputs, float32 CPU inference
    with autocast and torch.compile off, the fast paths on."""
    return (SWITCH.on and out_channels <= NARROW_MAX_OUT_CHANNELS and in_channels >= NARROW_MIN_IN_CHANNELS
            and plain_cpu_float32(x_BChw) and not torch.is_grad_enabled())


def conv3x3_by_taps(x_BChw: torch.Tensor, weight_OC33: torch.Tensor, bias_O: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) as one product with the tap weights and nine shifted sums, image by image."""
    B, C, h, w = x_BChw.shape
    O = weight_OC33.shape[0]
    weight_TOC = weight_OC33.permute(2, 3, 0, 1).reshape(9 * O, C)
    out_BOhw = x_BChw.new_empty(B, O, h, w)
    for x_Chw, out_Ohw in zip(x_BChw, out_BOhw):
        y_33Ohw = torch.mm(weight_TOC, x_Chw.reshape(C, h * w)).view(3, 3, O, h, w)
        out_Ohw.copy_(y_33Ohw[1, 1])
        if bias_O is not None:
            out_Ohw.add_(bias_O.view(O, 1, 1))
        for ky in range(3):
            for kx in range(3):
                dy, dx = ky - 1, kx - 1   # out[:, i, j] += y[ky, kx][:, i + dy, j + dx] where that lies inside the map
                if dy or dx:
                    out_Ohw[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
                        y_33Ohw[ky, kx, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out_BOhw
