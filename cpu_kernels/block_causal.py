"""CPU teacher forcing's self-attention from the fused qkv projection, in one autograd function.

From qkv (B, L, 3, H, c) as the qkv linear gives it: the optional L2 normalisation of q (times the learned
per-head scale) and k, block-causal attention group by group of scales (a `BlockCausal`), and the heads merged
into (B, L, C). It computes what SelfAttention's plain path computes (permute, F.normalize, attention with the
dense mask, transpose) up to float rounding, with fewer passes over memory:

- each group calls PyTorch's CPU flash-attention kernel directly and writes its output into one (B, L, H, c)
  buffer, which is already the (B, L, C) the output projection takes (no concatenation, no transpose copy);
- the backward writes every gradient into one (B, L, 3, H, c) buffer, the qkv linear's layout: q's gradient
  slice by slice, k's and v's accumulated over groups in place (no zero-filled full-size gradient per group,
  no stacking of q, k, v gradients, no permute copy);
- the L2 normalisation is one norm and one multiply forward, one dot product and one multiply-add backward;
- where the CPU's rule says so, the head dimension is 64 and the mask gives its rows' key ends (BlockCausal.over_scales),
  the attention itself, forward and backward, is this package's C kernel (c_attention.py) instead of PyTorch's
  flash kernel group by group; it writes q's, k's and v's gradients straight into the (B, L, 3, H, c) buffer;
- between forward and backward it keeps four (B, L, C) activations: with the L2 norm the normalised q and k, a copy
  of v and the output, and lets the raw qkv go (keeping both would be six); without it, qkv
  and the output.

It runs where `applies` says: on the CPU with the fast paths on (switch.py), float32, no dropout inside
attention, no autocast, not under torch.compile; elsewhere SelfAttention takes its plain path.

Letters: B batch, L tokens, H heads, c head dim, C = H·c, l tokens of one group, S keys of one group.
"""
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from models.attention import BlockCausal, flex

from . import c_attention
from .switch import SWITCH, plain_cpu_float32

__all__ = ['applies', 'block_causal_self_attention', 'c_kernel_applies']

_NORM_EPS = 1e-12   # F.normalize's default


def applies(qkv_BL3Hc: torch.Tensor, attn_bias, dropout_p: float, backend: str) -> bool:
    """Whether `block_causal_self_attention` may replace SelfAttention's plain path for this call ('flex': only where
    FlexAttention does not apply, i.e. CPU training)."""
    return (isinstance(attn_bias, BlockCausal) and SWITCH.on and backend != 'math' and dropout_p == 0.0
            and plain_cpu_float32(qkv_BL3Hc) and not (backend == 'flex' and flex.flex_applies(dropout_p, qkv_BL3Hc)))


def block_causal_self_attention(qkv_BL3Hc: torch.Tensor, scale_mul_1H11: Optional[torch.Tensor], scale: float,
                                mask: BlockCausal) -> torch.Tensor:
    """softmax(scale·q·kᵀ + block-causal mask)·v with heads merged → (B, L, C).

    scale_mul_1H11: None, or the per-head multiplier of the L2-normalised q (then k is L2-normalised too).
    """
    _check_groups(mask.groups, qkv_BL3Hc.shape[1])
    return _BlockCausalSelfAttention.apply(qkv_BL3Hc, scale_mul_1H11, scale, mask)


def _check_groups(groups, L: int) -> None:
    """The groups' queries tile [0, L) in order, each group reading keys [0, k_end) with q_end ≤ k_end ≤ L (as from
    block_causal_groups): then every output row is written and the last group reads all keys."""
    ends = [0] + [qe for _, qe, _, _ in groups]
    if not (groups and all(qb == ends[i] and qb < qe <= ke <= L for i, (qb, qe, ke, _) in enumerate(groups)) and ends[-1] == L):
        raise ValueError(f'block-causal groups {groups} do not tile the {L} tokens in order with q_end <= k_end <= {L} '
                         '(build them with block_causal_groups over the scales fed)')


def c_kernel_applies(head_dim: int, mask: BlockCausal) -> bool:
    """Whether the attention goes through the C kernel (c_attention.py): the mask gives its rows' key ends, the head
    dimension and this CPU suit it."""
    return mask.key_end is not None and c_attention.usable(head_dim)


def _l2_normalise(x_BLHc: torch.Tensor, mul=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x / max(‖x‖, eps) · mul, 1 / max(‖x‖, eps)) over the last dim; the reciprocal (B, L, H, 1) is for the backward."""
    inv_BLH1 = x_BLHc.norm(dim=-1, keepdim=True).clamp_min_(_NORM_EPS).reciprocal_()
    return x_BLHc * (inv_BLH1 if mul is None else inv_BLH1 * mul), inv_BLH1


def _l2_normalise_backward(grad_BLHc, y_BLHc, inv_BLH1, mul, out_BLHc) -> Optional[torch.Tensor]:
    """Gradient of y = x / max(‖x‖, eps) · mul with respect to x, written into out; returns the per-row dot ⟨y, grad⟩ (B, L, H, 1).

    dx = mul/‖x‖ · grad − ⟨y, grad⟩ / (mul·‖x‖) · y  (the second term only where ‖x‖ > eps: clamp_min's gradient, but at ‖x‖ = eps).
    """
    dot_BLH1 = (y_BLHc * grad_BLHc).sum(dim=-1, keepdim=True)
    kept_BLH1 = inv_BLH1 < inv_BLH1.new_tensor(_NORM_EPS).reciprocal_()   # ‖x‖ > eps, in the forward's float arithmetic
    if mul is None:
        torch.mul(grad_BLHc, inv_BLH1, out=out_BLHc)
        coef_BLH1 = dot_BLH1 * inv_BLH1
    else:
        torch.mul(grad_BLHc, inv_BLH1 * mul, out=out_BLHc)
        coef_BLH1 = dot_BLH1 * inv_BLH1 / mul
    out_BLHc.addcmul_(y_BLHc, coef_BLH1.mul_(kept_BLH1).neg_())
    return dot_BLH1


def _heads(x_BLHc: torch.Tensor, begin: int, end: int) -> torch.Tensor:
    """Tokens [begin, end) of (B, L, H, c) seen as (B, H, l, c), as the flash kernel takes them (a view)."""
    return x_BLHc[:, begin:end].transpose(1, 2)


def _flash_backward(mask: BlockCausal, lses, scale: float, grad_oup_BLHc, q_BLHc, k_BLHc, v_BLHc, oup_BLHc,
                    grad_q_BLHc, grad_k_BLHc, grad_v_BLHc) -> None:
    """PyTorch's flash backward group by group: q's gradient written slice by slice, k's and v's summed over groups."""
    L = q_BLHc.shape[1]
    by_keys = sorted(zip(mask.groups, lses), key=lambda group_lse: -group_lse[0][2])   # the first reads all L keys
    for i, ((qb, qe, ke, masked), lse_BHl) in enumerate(by_keys):
        gq_BHlc, gk_BHSc, gv_BHSc = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _heads(grad_oup_BLHc, qb, qe), _heads(q_BLHc, qb, qe), _heads(k_BLHc, 0, ke), _heads(v_BLHc, 0, ke),
            _heads(oup_BLHc, qb, qe), lse_BHl, 0.0, False,
            attn_mask=mask.bias[..., qb:qe, :ke] if masked else None, scale=scale)
        _heads(grad_q_BLHc, qb, qe).copy_(gq_BHlc)
        for total_BLHc, part_BHSc in ((grad_k_BLHc, gk_BHSc), (grad_v_BLHc, gv_BHSc)):
            if i == 0:
                _heads(total_BLHc, 0, L).copy_(part_BHSc)
            else:
                _heads(total_BLHc, 0, ke).add_(part_BHSc)


class _BlockCausalSelfAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, qkv_BL3Hc, scale_mul_1H11, scale, mask):
        B, L, _, H, c = qkv_BL3Hc.shape
        q_BLHc, k_BLHc, v_BLHc = qkv_BL3Hc.unbind(dim=2)
        mul_11H1 = None if scale_mul_1H11 is None else scale_mul_1H11.view(1, 1, H, 1)
        inv_q = inv_k = None
        if mul_11H1 is not None:
            q_BLHc, inv_q = _l2_normalise(q_BLHc, mul_11H1)
            k_BLHc, inv_k = _l2_normalise(k_BLHc)
        ctx.c_kernel = c_kernel_applies(c, mask)
        if ctx.c_kernel:   # all rows at once, each reading its keys
            oup_BLHc, lse_BHL = c_attention.forward(q_BLHc, k_BLHc, v_BLHc, mask.key_end, scale)
            lses = [lse_BHL]
        else:              # PyTorch's flash kernel, group by group of scales
            oup_BLHc, lses = qkv_BL3Hc.new_empty(B, L, H, c), []
            for qb, qe, ke, masked in mask.groups:
                oup_BHlc, lse_BHl = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    _heads(q_BLHc, qb, qe), _heads(k_BLHc, 0, ke), _heads(v_BLHc, 0, ke),
                    attn_mask=mask.bias[..., qb:qe, :ke] if masked else None, scale=scale)
                _heads(oup_BLHc, qb, qe).copy_(oup_BHlc)
                lses.append(lse_BHl)
        ctx.scale, ctx.mask, ctx.shape = scale, mask, qkv_BL3Hc.shape
        # the backward reads q, k and v as the attention did: with the L2 norm the normalised q and k and a copy of v
        # (so that the raw qkv is let go), without it qkv itself (q, k and v are views of it)
        kept = (None, q_BLHc, k_BLHc, v_BLHc.contiguous()) if mul_11H1 is not None else (qkv_BL3Hc, None, None, None)
        ctx.save_for_backward(*kept, mul_11H1, inv_q, inv_k, oup_BLHc, *lses)
        return oup_BLHc.view(B, L, H * c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_BLC):
        qkv_BL3Hc, q_BLHc, k_BLHc, v_BLHc, mul_11H1, inv_q, inv_k, oup_BLHc, *lses = ctx.saved_tensors
        B, L, _, H, c = ctx.shape
        l2 = mul_11H1 is not None
        if not l2:
            q_BLHc, k_BLHc, v_BLHc = qkv_BL3Hc.unbind(dim=2)
        grad_oup_BLHc = grad_BLC.contiguous().view(B, L, H, c)
        grad_BL3Hc = oup_BLHc.new_empty(B, L, 3, H, c)
        # gradients of the (normalised) q, k and v
        grad_q_BLHc = oup_BLHc.new_empty(B, L, H, c) if l2 else grad_BL3Hc[:, :, 0]
        grad_k_BLHc = oup_BLHc.new_empty(B, L, H, c) if l2 else grad_BL3Hc[:, :, 1]
        grad_v_BLHc = grad_BL3Hc[:, :, 2]
        if ctx.c_kernel:
            c_attention.backward(grad_oup_BLHc, q_BLHc, k_BLHc, v_BLHc, oup_BLHc, lses[0], ctx.mask.key_end, ctx.scale,
                                 grad_q_BLHc, grad_k_BLHc, grad_v_BLHc)
        else:
            _flash_backward(ctx.mask, lses, ctx.scale, grad_oup_BLHc, q_BLHc, k_BLHc, v_BLHc, oup_BLHc, grad_q_BLHc, grad_k_BLHc, grad_v_BLHc)
        grad_mul_1H11 = None
        if l2:
            dot_BLH1 = _l2_normalise_backward(grad_q_BLHc, q_BLHc, inv_q, mul_11H1, grad_BL3Hc[:, :, 0])
            grad_mul_1H11 = (dot_BLH1.sum(dim=(0, 1)) / mul_11H1.view(H, 1)).view(1, H, 1, 1)
            _l2_normalise_backward(grad_k_BLHc, k_BLHc, inv_k, None, grad_BL3Hc[:, :, 1])
        return grad_BL3Hc, grad_mul_1H11, None, None
