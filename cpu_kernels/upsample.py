"""Nearest-neighbour ×2 upsampling followed by a 3×3 conv (the tokenizer decoder's Upsample2x), by phases.

Reference path: interpolate ×2, then the 3×3 conv. Fast path (polyphase): the same result as four 2×2 convs on
the small input, interleaved: 2.25× fewer multiply-adds, equal up to float rounding (the taps are summed
first). It is taken over upsampling first and convolving by NNPACK's Winograd (winograd.py): that spends 1.78
multiply-adds per output against 4, but in AVX2 code, on the 4× larger input, after making the interpolation in
memory; and the phases round less (3e-6 vs 2e-4 off the plain path).

Where the conv at the large size goes by this package's Winograd kernel (c_winograd.py), that kernel reads the small
input as if upsampled instead, nothing made in memory, and is taken over the phases: AVX-512 code, and no
upsampled input to write or read.

Letters: B batch, C/O input/output channels, h/w height/width of the input; a/b output row/column parity.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import c_winograd
from .conv import conv2d
from .switch import SWITCH
from .winograd import conv3x3, conv3x3_uses_c_kernel

__all__ = ['upsample2x_conv3x3', 'upsample2x_conv3x3_reference', 'phase_kernels']


def phase_kernels(w_OC33: torch.Tensor) -> Dict[Tuple[int, int], torch.Tensor]:
    """The four 2×2 kernels (a, b) with conv3×3(nearest×2(x))[2i+a, 2j+b] = conv2×2_ab(x) at (i, j).

    Along each axis, output parity 0 reads input offsets (−1, 0) with taps (w0, w1 + w2), parity 1 reads
    offsets (0, +1) with taps (w0 + w1, w2).
    """
    def split(t, dim):
        w0, w1, w2 = t.unbind(dim)
        return torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)
    rows = split(w_OC33, 2)
    return {(a, b): col for a in (0, 1) for b, col in enumerate(split(rows[a], 3))}


def upsample2x_conv3x3_reference(x_BChw: torch.Tensor, weight_OC33: torch.Tensor, bias_O: Optional[torch.Tensor]) -> torch.Tensor:
    """The plain path: nearest ×2, then the 3×3 conv (B, C, h, w) → (B, O, 2h, 2w)."""
    return conv3x3(F.interpolate(x_BChw, scale_factor=2, mode='nearest'), weight_OC33, bias_O)


def upsample2x_conv3x3(x_BChw: torch.Tensor, weight_OC33: torch.Tensor, bias_O: Optional[torch.Tensor]) -> torch.Tensor:
    """conv3×3(nearest×2(x)) with padding 1: (B, C, h, w) → (B, O, 2h, 2w); polyphase where the fast paths are on."""
    B, _, h, w = x_BChw.shape
    O = weight_OC33.shape[0]
    if not SWITCH.on or x_BChw.device.type != 'cpu':   # a CPU path: CUDA keeps the reference's ops
        return upsample2x_conv3x3_reference(x_BChw, weight_OC33, bias_O)
    C = weight_OC33.shape[1]
    if conv3x3_uses_c_kernel(x_BChw, C, O, 2 * h, 2 * w):   # upsampled as the kernel reads
        return c_winograd.conv3x3(x_BChw, weight_OC33, bias_O, upsample=True)
    kernels = phase_kernels(weight_OC33)
    x_pad = F.pad(x_BChw, (1, 1, 1, 1))
    if x_BChw.is_contiguous(memory_format=torch.channels_last) and not x_BChw.is_contiguous():
        out_BhawbO = x_BChw.new_empty(B, h, 2, w, 2, O)
        for (a, b), k in kernels.items():
            out_BhawbO[:, :, a, :, b] = conv2d(x_pad[:, :, a:a + h + 1, b:b + w + 1], k, bias_O).permute(0, 2, 3, 1)
        return out_BhawbO.view(B, 2 * h, 2 * w, O).permute(0, 3, 1, 2)  # channels-last B, O, 2h, 2w
    out_BOhawb = x_BChw.new_empty(B, O, h, 2, w, 2)
    for (a, b), k in kernels.items():
        out_BOhawb[:, :, :, a, :, b] = conv2d(x_pad[:, :, a:a + h + 1, b:b + w + 1], k, bias_O)
    return out_BOhawb.view(B, O, 2 * h, 2 * w)
