"""Memory layout and working set of the tokenizer's inference: channels-last or NCHW activations, in-place residual
adds, images in groups under a byte budget with their large activations from the heap (heap.py). Each has the
reference's plain behaviour as its switched-off path (switch.py): the layout the caller gave, `shortcut + h`, the
whole batch at once.

Letters: B batch, C channels, h/w height/width, H/W image height/width.
"""
from typing import Callable

import torch

from .heap import large_buffers_from_heap
from .switch import SWITCH
from .winograd import WINOGRAD_MIN_CHANNELS, winograd_applies, winograd_reads_channels_last

__all__ = ['CHANNELS_LAST_MIN_WIDTH', 'CPU_CHUNK_BYTES', 'channels_last_pays', 'to_conv_layout', 'residual_add',
           'images_per_group', 'in_image_groups']

CHANNELS_LAST_MIN_WIDTH = 64

# In inference without autograd on the CPU, images go through the encoder and the decoder in groups whose
# full-resolution activation stays under this many bytes (one 256-px image for the published tokenizer): as fast
# as one batch for oneDNN's convs, the batch size NNPACK's Winograd convs want (winograd.py), a quarter of the
# working memory of a batch of four, and each image's tokens and
# pixels no longer depend on the other images of its batch. On CUDA the batch goes through whole, as in the reference.
CPU_CHUNK_BYTES = 64 * 2 ** 20


def channels_last_pays(ch: int) -> bool:
    """Channels-last convs pay off for wide tokenizers (the published ch=160, encoder and decoder); in a narrow one
    (ch=32) oneDNN's reorders between layouts cost more than the convs gain, so narrow tokenizers keep NCHW."""
    return ch >= CHANNELS_LAST_MIN_WIDTH


def to_conv_layout(x_BChw: torch.Tensor, ch: int, channels_last: bool) -> torch.Tensor:
    """The encoder's or decoder's input (base width `ch`) in the memory layout its convs run fastest on: NCHW where
    the wide ones go by NNPACK's Winograd (it reads NCHW), else channels-last where the net asks for it (`channels_last`,
    see channels_last_pays); unchanged with the fast paths off."""
    if not SWITCH.on or x_BChw.device.type != 'cpu':   # a CPU layout: on CUDA a channels-last GroupNorm converts back
        return x_BChw
    if ch >= WINOGRAD_MIN_CHANNELS and winograd_applies(x_BChw) and not winograd_reads_channels_last():
        return x_BChw.contiguous()
    if channels_last:
        return x_BChw.contiguous(memory_format=torch.channels_last)
    return x_BChw


def residual_add(shortcut: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """shortcut + h; without autograd written into `h` (a fresh activation the caller owns): the same values, one
    full-size activation fewer alive at a time."""
    if SWITCH.on and not torch.is_grad_enabled():
        return h.add_(shortcut)
    return shortcut + h


def images_per_group(x_BChw: torch.Tensor, ch: int, H: int, W: int) -> int:
    """How many images go through a net of base width `ch` at once for output side H×W: the whole batch unless
    CPU inference with the fast paths on, then as many as keep a full-resolution activation under CPU_CHUNK_BYTES."""
    B = x_BChw.shape[0]
    if not SWITCH.on or x_BChw.device.type != 'cpu' or torch.is_grad_enabled():
        return B
    return max(1, CPU_CHUNK_BYTES // (ch * H * W * x_BChw.element_size()))


def in_image_groups(fn: Callable[[torch.Tensor], torch.Tensor], x_BChw: torch.Tensor, ch: int, H: int, W: int) -> torch.Tensor:
    """fn(x) for a batch-independent fn, computed on groups of images (images_per_group) and concatenated; in CPU
    inference with the fast paths on, with its large activations taken from the heap (heap.py)."""
    if not (SWITCH.on and x_BChw.device.type == 'cpu' and not torch.is_grad_enabled()):   # the whole batch, as the reference
        return fn(x_BChw)
    n = images_per_group(x_BChw, ch, H, W)
    with large_buffers_from_heap():
        return fn(x_BChw) if n >= x_BChw.shape[0] else torch.cat([fn(chunk) for chunk in x_BChw.split(n)])
