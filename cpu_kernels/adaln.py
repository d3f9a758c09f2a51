"""Adaptive layer norm, LN(x)·(1 + scale) + shift, whose training backward keeps x instead of LN(x).

Reference path: the layer norm, then `.mul(scale.add(1)).add_(shift)`; autograd keeps the norm's input x and its
output LN(x) (for the gradient of scale). Fast path (training with the fast paths on, no autocast): the same ops
in both passes, so the same numbers bit for bit, but the backward recomputes LN(x) from x and the norm's saved
mean and 1/std; one (B, L, C) activation fewer kept per AdaLN: two per transformer block, 90 MiB in the d8 step at
batch 4. Inference, autocast, torch.compile and switched off: the reference path.

Letters: B batch, L tokens, C width.
"""
from typing import List

import torch
import torch.nn as nn

from .switch import SWITCH, compiling, cpu_autocast_enabled

__all__ = ['ada_layer_norm', 'ada_layer_norm_reference']


def ada_layer_norm_reference(ln: nn.LayerNorm, x_BLC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor) -> torch.Tensor:
    """The plain path: ln(x) · (1 + scale) + shift."""
    return ln(x_BLC).mul(scale_B1C.add(1)).add_(shift_B1C)


class _AdaLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BLC, scale_B1C, shift_B1C, normalized_shape: List[int], eps: float):
        ln_BLC, mean, rstd = torch.native_layer_norm(x_BLC, normalized_shape, None, None, eps)
        scale1_B1C = scale_B1C.add(1)
        ctx.save_for_backward(x_BLC, mean, rstd, scale1_B1C)
        ctx.normalized_shape, ctx.eps = normalized_shape, eps
        return ln_BLC.mul(scale1_B1C).add_(shift_B1C)

    @staticmethod
    def backward(ctx, grad_BLC):
        x_BLC, mean, rstd, scale1_B1C = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        grad_x = grad_scale = grad_shift = None
        if need_shift:
            grad_shift = grad_BLC.sum_to_size(scale1_B1C.shape)
        if need_scale:
            ln_BLC = torch.native_layer_norm(x_BLC, ctx.normalized_shape, None, None, ctx.eps)[0]
            grad_scale = grad_BLC.mul(ln_BLC).sum_to_size(scale1_B1C.shape)
        if need_x:
            grad_x = torch.ops.aten.native_layer_norm_backward(grad_BLC.mul(scale1_B1C), x_BLC, ctx.normalized_shape, mean, rstd,
                                                               None, None, [True, False, False])[0]
        return grad_x, grad_scale, grad_shift, None, None


def ada_layer_norm(ln: nn.LayerNorm, x_BLC: torch.Tensor, scale_B1C: torch.Tensor, shift_B1C: torch.Tensor) -> torch.Tensor:
    """ln(x) · (1 + scale) + shift for a LayerNorm without affine parameters; (B, L, C) → (B, L, C). In training it
    keeps x, not ln(x), for the backward (see above)."""
    if (not SWITCH.on or not torch.is_grad_enabled() or ln.weight is not None or ln.bias is not None
            or not (x_BLC.requires_grad or scale_B1C.requires_grad or shift_B1C.requires_grad)
            or cpu_autocast_enabled() or torch.is_autocast_enabled() or compiling()):
        return ada_layer_norm_reference(ln, x_BLC, scale_B1C, shift_B1C)
    return _AdaLayerNorm.apply(x_BLC, scale_B1C, shift_B1C, list(ln.normalized_shape), ln.eps)
