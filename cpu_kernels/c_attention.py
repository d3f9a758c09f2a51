"""Attention by this package's C kernel (csrc/block_causal_attention.c): float32, head dimension 64, AVX-512.

Each query row reads a prefix of the keys, [0, key_end[row]): block-causal teacher forcing (block_causal.py, forward
and backward) and a scale's queries against the whole KV cache in sampling (attention.py, forward only).
PyTorch's CPU flash kernel computes the same by calling MKL's GEMM on small blocks, and MKL runs its AVX2 code on
AMD CPUs; this kernel does every product with AVX-512 register blocks, reads the keys each row needs only, and takes
q, k, v and their gradients in whatever (B, L, H, c) layout they are (the qkv projection's, the KV cache's).
Results differ from PyTorch's by float rounding (~2e-7 of the output's scale, gradients ~4e-7, as PyTorch's own
against float64).

It runs where the CPU's rule says (cpu_rules.py: `c_attention`) and it could be built (native.py); elsewhere
the callers keep PyTorch's kernel. Letters: B batch, L query rows, S keys, H heads, c head dim.
"""
import ctypes
import functools

import torch

from . import native
from .choices import cpu_rule

__all__ = ['C_KERNEL', 'C_HEAD_DIM', 'status', 'usable', 'forward', 'backward']

C_KERNEL = 'block_causal_attention'   # csrc/block_causal_attention.c
C_HEAD_DIM = 64                       # the head dimension it is written for (VAR's at every depth: C = 64·depth, depth heads)


@functools.lru_cache(maxsize=None)
def _kernels():
    """(forward, backward) with their ctypes signatures, or None where the library cannot be built (native.py)."""
    lib, _ = native.library(C_KERNEL)
    if lib is None:
        return None
    view = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]   # data, strides of b, h, t (in floats)
    fwd, bwd = lib.block_causal_attention_forward, lib.block_causal_attention_backward
    fwd.argtypes = [ctypes.c_int] * 5 + view * 4 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]   # bh range, H, L, S
    bwd.argtypes = [ctypes.c_int] * 4 + view * 5 + [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float] + view * 3
    fwd.restype = bwd.restype = ctypes.c_int
    return fwd, bwd


def status() -> str:
    """'' where the kernel runs on this CPU, else why not (the CPU's rule, or why it could not be built)."""
    if not cpu_rule().c_attention:
        return 'not chosen for this CPU'
    return '' if _kernels() is not None else native.library(C_KERNEL)[1]


def usable(head_dim: int) -> bool:
    """Whether the kernel may compute an attention of this head dimension here: chosen for this CPU and built. The caller
    has checked the rest (float32 on the CPU, autocast and torch.compile off, the fast paths on)."""
    return head_dim == C_HEAD_DIM and cpu_rule().c_attention and _kernels() is not None


def _view(x_BLHc: torch.Tensor):
    """A (B, L, H, c) float32 CPU view as the kernel takes it: data pointer, then the strides of b, h and t."""
    if x_BLHc.dtype != torch.float32 or x_BLHc.device.type != 'cpu' or x_BLHc.stride(3) != 1 or x_BLHc.shape[3] != C_HEAD_DIM:
        raise ValueError(f'the C attention kernel takes float32 CPU (B, L, H, {C_HEAD_DIM}) views with the last dim contiguous, '
                         f'got {x_BLHc.dtype} {tuple(x_BLHc.shape)} strides {x_BLHc.stride()} on {x_BLHc.device}')
    return x_BLHc.data_ptr(), x_BLHc.stride(0), x_BLHc.stride(2), x_BLHc.stride(1)


def _key_end(key_end_L: torch.Tensor, L: int, S: int) -> torch.Tensor:
    if key_end_L.shape != (L,) or key_end_L.dtype != torch.int32 or key_end_L.device.type != 'cpu' or not key_end_L.is_contiguous():
        raise ValueError(f'key_end must be a contiguous CPU int32 tensor of the {L} query rows, got {key_end_L.dtype} '
                         f'{tuple(key_end_L.shape)} (BlockCausal.over_scales builds it)')
    if L and not (1 <= int(key_end_L[0]) and int(key_end_L[-1]) <= S and bool((key_end_L[1:] >= key_end_L[:-1]).all())):
        raise ValueError(f'key_end must not decrease and lie in [1, {S}] (every row reads at least one of the {S} keys)')
    return key_end_L


def forward(q_BLHc: torch.Tensor, k_BSHc: torch.Tensor, v_BSHc: torch.Tensor, key_end_L: torch.Tensor, scale: float):
    """(softmax(scale·q·kᵀ over keys [0, key_end[row]))·v as (B, L, H, c), log-sum-exp (B, H, L)), no autograd."""
    B, L, H, c = q_BLHc.shape
    S = k_BSHc.shape[1]
    oup_BLHc, lse_BHL = q_BLHc.new_empty(B, L, H, c), q_BLHc.new_empty(B, H, L)
    native.run_split(_kernels()[0], B * H, (H, L, S, *_view(q_BLHc), *_view(k_BSHc), *_view(v_BSHc), *_view(oup_BLHc),
                                            lse_BHL.data_ptr(), _key_end(key_end_L, L, S).data_ptr(), scale))
    return oup_BLHc, lse_BHL


def backward(grad_oup_BLHc, q_BLHc, k_BLHc, v_BLHc, oup_BLHc, lse_BHL, key_end_L, scale: float, grad_q_BLHc, grad_k_BLHc, grad_v_BLHc) -> None:
    """The gradients of `forward`'s q, k and v (L keys), written into the three given (B, L, H, c) views."""
    B, L, H, _ = q_BLHc.shape
    native.run_split(_kernels()[1], B * H, (
        H, L, *_view(q_BLHc), *_view(k_BLHc), *_view(v_BLHc), *_view(oup_BLHc), *_view(grad_oup_BLHc), lse_BHL.data_ptr(),
        _key_end(key_end_L, L, L).data_ptr(), scale, *_view(grad_q_BLHc), *_view(grad_k_BLHc), *_view(grad_v_BLHc)))
