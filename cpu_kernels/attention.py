"""CPU attention of the converted transformer: block-causal teacher forcing group by group of scales, and unmasked
attention without autograd (sampling's queries against the KV cache) by this package's C kernel.

models.attention.attention computes a `BlockCausal` mask with its dense L×L bias, as the reference does. On the CPU
with the fast paths on (switch.py) this function instead goes group by group of scales: large scales alone, their
queries reading the whole prefix unmasked, the small ones together under their slice of the mask (fewer scores
computed and masked away). On CUDA the groups' slices, copies and zero-filled slice gradients cost more than the
masked-out third of attention saves, so CUDA calls keep the plain path. Where the CPU's rule chooses it, unmasked
float32 attention without autograd goes through the C kernel (c_attention.py). Everything else is
models.attention.attention, unchanged.

Letters: B batch, H heads, L query tokens, S key tokens, c head dim.
"""
import functools

import torch

from models.attention import BlockCausal, attention as plain_attention, flex_block_mask

from . import c_attention
from .switch import SWITCH, plain_cpu_float32

__all__ = ['attention', 'c_kernel_applies']


def c_kernel_applies(q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor) -> bool:
    """Unmasked attention without autograd (a scale against the KV cache in sampling) by the C kernel (c_attention.py):
    float32 CPU, fast paths on, a CPU and head dimension it suits."""
    return (SWITCH.on and plain_cpu_float32(q_BHLc) and all(t.dtype == torch.float32 for t in (k_BHSc, v_BHSc))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHLc, k_BHSc, v_BHSc)))
            and all(t.stride(-1) == 1 for t in (q_BHLc, k_BHSc, v_BHSc)) and c_attention.usable(q_BHLc.shape[-1]))


@functools.lru_cache(maxsize=64)
def _all_keys(L: int, S: int) -> torch.Tensor:
    """(L,) int32: every query row reads all S keys."""
    return torch.full((L,), S, dtype=torch.int32)


def attention(q_BHLc: torch.Tensor, k_BHSc: torch.Tensor, v_BHSc: torch.Tensor, scale: float,
              attn_bias=None, dropout_p: float = 0.0, backend: str = 'sdpa') -> torch.Tensor:
    """models.attention.attention (the same arguments, the same result up to float rounding), with the CPU paths above."""
    if backend == 'flex':
        if flex_block_mask(q_BHLc, k_BHSc, v_BHSc, attn_bias, dropout_p) is not None:
            return plain_attention(q_BHLc, k_BHSc, v_BHSc, scale, attn_bias, dropout_p, backend)
        backend = 'sdpa'   # where flex does not apply, what models.attention falls back to
    if isinstance(attn_bias, BlockCausal):
        if SWITCH.on and backend != 'math' and q_BHLc.device.type == 'cpu':
            return _block_causal_attention(q_BHLc, k_BHSc, v_BHSc, scale, attn_bias, dropout_p, backend)
        attn_bias = attn_bias.bias
    if backend != 'math' and attn_bias is None and dropout_p == 0.0 and c_kernel_applies(q_BHLc, k_BHSc, v_BHSc):
        L, S = q_BHLc.shape[2], k_BHSc.shape[2]
        oup_BLHc, _ = c_attention.forward(q_BHLc.transpose(1, 2), k_BHSc.transpose(1, 2), v_BHSc.transpose(1, 2), _all_keys(L, S), scale)
        return oup_BLHc.transpose(1, 2)
    return plain_attention(q_BHLc, k_BHSc, v_BHSc, scale, attn_bias, dropout_p, backend)


def _block_causal_attention(q_BHLc, k_BHLc, v_BHLc, scale: float, mask: BlockCausal, dropout_p: float, backend: str) -> torch.Tensor:
    outs = []
    for qb, qe, ke, masked in mask.groups:
        bias = mask.bias[..., qb:qe, :ke] if masked else None
        outs.append(attention(q_BHLc[:, :, qb:qe], k_BHLc[:, :, :ke], v_BHLc[:, :, :ke], scale, bias, dropout_p, backend))
    return torch.cat(outs, dim=2)
