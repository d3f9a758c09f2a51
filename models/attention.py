"""Attention kernels of the VAR transformer and the choice between them.

PyTorch's scaled-dot-product attention ('sdpa') is the default. flash-attn ('flash') and xformers
('xformers') are used when installed, on CUDA, where they apply; 'math' is the plain
matmul-softmax reference that every other path is tested against. 'flex' sends block-causal teacher forcing through
FlexAttention with VAR's BlockMask, built once per shape (flex_attention.py; fused under torch.compile), and everything else
to SDPA. The backend is the model's choice (`VAR.set_attn_backend`, as in the reference's flash_if_available).

Block-causal teacher forcing (a `BlockCausal` spec) goes through its dense L×L mask as in the reference ('flex'
builds its block mask from the scales instead). cpu_kernels/attention.py, which a converted model calls instead of
this function, goes group by group of scales on the CPU.

Letters: B batch, H heads, L query tokens, S key tokens, c head dim.
"""
import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import flex_attention as flex

__all__ = ['BACKENDS', 'attention', 'BlockCausal', 'block_causal_groups', 'block_causal_key_ends', 'backend_status', 'choose_backend',
           'describe_backends', 'flash_attn_func', 'xformers_attn_func', 'flex_available', 'flex_block_mask']

logger = logging.getLogger(__name__)

BACKENDS = ('sdpa', 'math', 'flash', 'xformers', 'flex')
flex_available = flex.flex_available


@functools.lru_cache(maxsize=None)
def _optional(module: str, name: str) -> Optional[Callable]:
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # not installed, or built for another torch / CUDA: the backend is unavailable
        return None


def flash_attn_func() -> Optional[Callable]:
    """flash_attn.flash_attn_func if flash-attn is installed and importable, else None."""
    return _optional('flash_attn', 'flash_attn_func')


def xformers_attn_func() -> Optional[Callable]:
    """xformers.ops.memory_efficient_attention if xformers is installed and importable, else None."""
    return _optional('xformers.ops', 'memory_efficient_attention')


def choose_backend(flash_if_available: bool) -> str:
    """'flash' or 'xformers' when asked for, installed and CUDA is present, else 'sdpa'."""
    if flash_if_available and torch.cuda.is_available():
        if flash_attn_func() is not None:
            return 'flash'
        if xformers_attn_func() is not None:
            return 'xformers'
    return 'sdpa'


def describe_backends(chosen: str) -> str:
    installed = [name for name, fn in (('flash-attn', flash_attn_func), ('xformers', xformers_attn_func)) if fn() is not None]
    detail = {
        'sdpa': 'torch.nn.functional.scaled_dot_product_attention',
        'math': 'plain matmul-softmax',
        'flash': 'flash-attn for unmasked half-precision attention (KV-cached sampling), SDPA otherwise',
        'xformers': 'xformers memory_efficient_attention on CUDA, SDPA otherwise',
        'flex': _describe_flex,
    }[chosen]
    detail = detail() if callable(detail) else detail
    return f'{chosen} ({detail}); optional kernels installed: {", ".join(installed) or "none"}'


def _describe_flex() -> str:
    where = tuple(d for d in ('cuda', 'cpu') if flex_available(d))
    here = {('cuda', 'cpu'): 'available on CUDA and the CPU (CPU: forward only; CPU training attends as sdpa does)',
            ('cuda',): 'available on CUDA',
            ('cpu',): 'available on the CPU only, forward only (CPU training attends as sdpa does)',
            (): 'unavailable here: everything goes to SDPA'}[where]
    return ("FlexAttention with VAR's block-causal BlockMask (built once per shape) for teacher forcing, fused only under "
            'torch.compile (eager FlexAttention computes the whole score matrix: correct, slow); SDPA for sampling, '
            f'attention dropout and where flex is unavailable; {here}')


def _math_attention(q_BHLc, k_BHSc, v_BHSc, scale: float, attn_bias: Optional[torch.Tensor], dropout_p: float):
    attn_BHLS = q_BHLc.mul(scale) @ k_BHSc.transpose(-2, -1)
    if attn_bias is not None:
        if attn_bias.dtype == torch.bool:
            attn_BHLS = attn_BHLS.masked_fill(~attn_bias, float('-inf'))
        else:
            attn_BHLS = attn_BHLS + attn_bias
    attn_BHLS = attn_BHLS.softmax(dim=-1)
    if dropout_p > 0:
        attn_BHLS = F.dropout(attn_BHLS, p=dropout_p)
    return attn_BHLS @ v_BHSc


def attention(q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, scale: float,
              attn_bias=None, dropout_p: float = 0.0, backend: str = 'sdpa') -> torch.Tensor:
    """softmax(scale·q·kᵀ + bias)·v → (B, H, L, c).

    attn_bias: None, an additive float mask or a boolean keep-mask broadcastable to (B, H, L, S), or a
    `BlockCausal` (S = L: its dense mask; 'flex' its BlockMask).
    A backend that does not apply to the call (no CUDA, a mask flash-attn cannot take, float32 for
    flash-attn; for 'flex' anything but block-causal teacher forcing without dropout) falls back to SDPA.
    """
    if backend == 'flex':
        block_mask = flex_block_mask(q_BHLc, k_BHSc, v_BHSc, attn_bias, dropout_p)
        if block_mask is not None:
            return flex.block_causal_flex_attention(q_BHLc, k_BHSc, v_BHSc, scale, block_mask)
        backend = 'sdpa'
    if isinstance(attn_bias, BlockCausal):
        attn_bias = attn_bias.bias
    if backend == 'math':
        return _math_attention(q_BHLc, k_BHSc, v_BHSc, scale, attn_bias, dropout_p)
    on_cuda = q_BHLc.is_cuda and not torch.compiler.is_compiling()   # under torch.compile SDPA: flash-attn's and xformers' ops break the graph
    if backend == 'flash' and on_cuda and attn_bias is None and q_BHLc.dtype in (torch.float16, torch.bfloat16):
        fn = flash_attn_func()
        if fn is not None:  # flash-attn takes (B, L, H, c)
            oup_BLHc = fn(q_BHLc.transpose(1, 2), k_BHSc.transpose(1, 2), v_BHSc.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale)
            return oup_BLHc.transpose(1, 2)
    if backend == 'xformers' and on_cuda:
        fn = xformers_attn_func()
        if fn is not None:  # xformers takes (B, L, H, c) and a float bias of the full (B, H, L, S) shape
            bias = attn_bias
            if bias is not None:
                if bias.dtype == torch.bool:
                    bias = torch.zeros(bias.shape, dtype=q_BHLc.dtype, device=bias.device).masked_fill_(~bias, float('-inf'))
                B, H, L, _ = q_BHLc.shape
                bias = bias.to(q_BHLc.dtype).expand(B, H, L, k_BHSc.shape[2])
            oup_BLHc = fn(q_BHLc.transpose(1, 2), k_BHSc.transpose(1, 2), v_BHSc.transpose(1, 2),
                          attn_bias=bias, p=dropout_p, scale=scale)
            return oup_BLHc.transpose(1, 2)
    return F.scaled_dot_product_attention(q_BHLc, k_BHSc, v_BHSc, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale)


def flex_block_mask(q_BHLc, k_BHSc, v_BHSc, attn_bias, dropout_p: float):
    """The BlockMask for this call on the 'flex' backend, or None where flex does not apply (no mask: sampling against
    the KV cache; dropout; flex unavailable; a mask that is not block-causal over scales)."""
    if attn_bias is None or not flex.flex_applies(dropout_p, q_BHLc, k_BHSc, v_BHSc):
        return None
    L = q_BHLc.shape[2]
    if k_BHSc.shape[2] != L:
        return None
    lengths = None
    if isinstance(attn_bias, BlockCausal):
        if attn_bias.flex_mask is not None:   # made by over_scales, outside the compiled blocks
            return attn_bias.flex_mask
        lengths = attn_bias.scale_lengths or None
        attn_bias = attn_bias.bias
    if lengths is None:
        if torch.compiler.is_compiling():   # which scales a dense mask holds is read on the host: not while tracing
            return None
        lengths = flex.scale_lengths_of_mask(attn_bias, L)
    if lengths is None or sum(lengths) != L:
        return None
    return flex.block_mask_over_scales(lengths, q_BHLc.device)


@dataclass(frozen=True)
class BlockCausal:
    """Block-causal attention over scales, computed group by group instead of with one dense L×L mask.

    groups: (q_begin, q_end, k_end, masked). Queries [q_begin, q_end) attend to keys [0, k_end); a masked
    group also needs `bias` (the dense additive mask) over that window. Large scales form unmasked groups
    of their own (their queries see the whole prefix), small ones share one masked group.
    key_end: None, or (L,) int32 on the CPU: query row i reads keys [0, key_end[i]) (what `bias` says row by row, for
    kernels that take the mask as row lengths: cpu_kernels/block_causal.py). Build both with `over_scales`.
    scale_lengths: the scales' token counts (over_scales records them; the 'flex' backend's BlockMask is made from them).
    flex_mask: None, or that BlockMask on the bias's device (over_scales(..., flex_mask=True), outside torch.compile).
    """
    groups: Tuple[Tuple[int, int, int, bool], ...]
    bias: torch.Tensor
    key_end: Optional[torch.Tensor] = None
    scale_lengths: Tuple[int, ...] = ()
    flex_mask: Optional[object] = None

    @classmethod
    def over_scales(cls, scale_lengths: Sequence[int], bias: torch.Tensor, flex_mask: bool = False) -> 'BlockCausal':
        """The mask of scales of these token counts (bias: their dense block-causal mask, as the model keeps it);
        flex_mask: also its FlexAttention BlockMask (kept across calls: flex.block_mask_over_scales) where flex runs."""
        lengths = tuple(int(n) for n in scale_lengths)
        block_mask = flex.block_mask_over_scales(lengths, bias.device) if flex_mask and flex_available(bias.device) else None
        return cls(block_causal_groups(lengths), bias, block_causal_key_ends(lengths), lengths, block_mask)


def block_causal_key_ends(scale_lengths: Sequence[int]) -> torch.Tensor:
    """(L,) int32: every token of a scale reads the tokens of its own and the coarser scales, [0, end of its scale)."""
    lengths = torch.tensor(scale_lengths, dtype=torch.int64)
    return torch.repeat_interleave(lengths.cumsum(0), lengths).to(torch.int32)


def block_causal_groups(scale_lengths: Sequence[int], alone_from: int = 64) -> Tuple[Tuple[int, int, int, bool], ...]:
    """Groups for scales of these token counts: scales of at least `alone_from` tokens alone, the others merged."""
    groups, start, cur = [], 0, 0
    for n in scale_lengths:
        if n >= alone_from:
            if cur > start:
                groups.append((start, cur, cur, True))
            groups.append((cur, cur + n, cur + n, False))
            start = cur + n
        cur += n
    if cur > start:
        groups.append((start, cur, cur, True))
    return tuple(groups)


def _check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f'attention backend {name!r} is not one of {BACKENDS}')
    return name


def backend_status(name: str) -> Tuple[bool, str]:
    """(usable here, why not) for a backend name."""
    _check_backend(name)
    if name in ('sdpa', 'math'):
        return True, ''
    if name == 'flex':
        if flex_available('cuda'):
            return True, ''
        return False, ('needs CUDA with Triton (FlexAttention on the CPU runs forward only)' if flex_available('cpu') else
                       'torch.nn.attention.flex_attention is not in this PyTorch')
    if not torch.cuda.is_available():
        return False, 'needs CUDA'
    fn = flash_attn_func() if name == 'flash' else xformers_attn_func()
    return (fn is not None), ('' if fn is not None else f'{name} is not installed')
