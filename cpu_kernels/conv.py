"""Convolutions of the tokenizer whose every image's result does not depend on the rest of its batch (CPU inference).

PyTorch picks a CPU float32 conv kernel by the batch size: oneDNN for batches of two or more, its own im2col + GEMM
('slow2d') for a single image whose input has at most 20480 values, and, with one thread, im2col for 1×1 convs
under 16 images. The two kernels round differently (~1e-6), which moved sampled images by one uint8 level
between `sample.py --bs=1` and `--bs=2` (the tokenizer's phi convs and decoder), and between batches under and
over 16 images with OMP_NUM_THREADS=1. Without autograd on the CPU in float32 these convs always call oneDNN's
conv, the kernel PyTorch itself uses for batches, so results are those of a batch of two or more, image by image.

Not a speed path but a reproducibility guarantee, so the fast-path switch (switch.py) leaves it on: with the
switch off `sample.py --bs=1` and `--bs=2` still give the same pixels. `conv2d_reference` is F.conv2d.

Letters: B batch, C/O input/output channels, h/w height/width.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .switch import plain_cpu_float32

__all__ = ['BatchInvariantConv', 'Conv2d', 'conv2d', 'conv2d_reference', 'batch_invariant_applies', 'onednn_conv_available']


@functools.lru_cache(maxsize=None)
def onednn_conv_available() -> bool:
    """Whether oneDNN's conv runs here (PyTorch built with oneDNN, a CPU it supports)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.ones(1, 2, 3, 3, device='cpu'), torch.ones(4, 2, 3, 3, device='cpu')   # explicit: may run inside `with torch.device(...)`
        return bool(torch.equal(torch.mkldnn_convolution(x, w, None, [1, 1], [1, 1], [1, 1], 1), F.conv2d(x, w, padding=1)))
    except (AttributeError, RuntimeError):
        return False


def batch_invariant_applies(x: torch.Tensor) -> bool:
    """Whether `x` goes through oneDNN's conv: float32 CPU inference, autocast and torch.compile off, oneDNN present and enabled."""
    return (plain_cpu_float32(x) and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled
            and onednn_conv_available())


def conv2d(x_BChw: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1) -> torch.Tensor:
    """F.conv2d with zero padding; in CPU float32 inference by oneDNN whatever the batch size (see above)."""
    if batch_invariant_applies(x_BChw) and weight.dtype == torch.float32 and x_BChw.numel() > 0:
        return torch.mkldnn_convolution(x_BChw, weight, bias, list(padding), list(stride), list(dilation), groups)
    return F.conv2d(x_BChw, weight, bias, stride, padding, dilation, groups)


conv2d_reference = F.conv2d   # the plain path: whatever kernel PyTorch picks for the batch


class BatchInvariantConv:
    """Mixin for nn.Conv2d subclasses: `_conv_forward` by `conv2d` (zero padding; other padding as nn.Conv2d's)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode != 'zeros' or isinstance(self.padding, str):
            return super()._conv_forward(x, weight, bias)
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2d(BatchInvariantConv, nn.Conv2d):
    """nn.Conv2d (same parameters and checkpoint keys) computed by `conv2d`."""
