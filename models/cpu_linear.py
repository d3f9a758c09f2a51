"""Float32 linear layers on the CPU through oneDNN's matmul instead of MKL's sgemm.

PyTorch computes a float32 `F.linear` on the CPU with MKL (`addmm`: the bias is first broadcast into the
output, then the GEMM adds to it). On this project's 2-core Zen 4 CPU that runs the transformer's shapes
at 110-175 GFLOP/s; oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, which torch.compile's CPU
backend calls) runs them at 165-207 GFLOP/s, adds the bias in its epilogue and can apply the FFN's GELU
there too. The input gradient goes through oneDNN as well (1.1-1.3×); the weight gradient stays with MKL
(as fast). Results differ from MKL's by float rounding (~1e-6 relative).

Used for float32 on the CPU with autocast off (bf16/fp16 autocast, torch.compile and CUDA keep F.linear), when this
PyTorch build has oneDNN; `Linear.onednn = False` (VAR.set_fast_paths(False)) keeps F.linear.

Letters: N rows (all leading dimensions together), K input features, O output features.
"""
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_context import compiling, cpu_autocast_enabled

__all__ = ['Linear', 'linear', 'onednn_applies', 'onednn_available']


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether oneDNN's linear runs here (PyTorch built with oneDNN, an x86 or ARM CPU it supports)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.ones(2, 3), torch.ones(4, 3)
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], ''), F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


def onednn_applies(x: torch.Tensor) -> bool:
    """Whether `x` may go through oneDNN: float32 on the CPU, autocast off, not under torch.compile, oneDNN present."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and not cpu_autocast_enabled() and not compiling()
            and onednn_available())


def _onednn_linear(x_NK: torch.Tensor, weight_OK: torch.Tensor, bias_O: Optional[torch.Tensor], gelu_tanh: bool = False) -> torch.Tensor:
    if gelu_tanh:
        return torch.ops.mkldnn._linear_pointwise(x_NK, weight_OK, bias_O, 'gelu', [], 'tanh')
    return torch.ops.mkldnn._linear_pointwise(x_NK, weight_OK, bias_O, 'none', [], '')


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NK, weight_OK, bias_O):
        ctx.save_for_backward(x_NK, weight_OK)
        ctx.has_bias = bias_O is not None
        return _onednn_linear(x_NK, weight_OK, bias_O)

    @staticmethod
    def backward(ctx, grad_NO):
        x_NK, weight_OK = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad_NO, weight_OK.t().contiguous(), None)   # (N, O) @ (O, K)
        if ctx.needs_input_grad[1]:
            grad_w = grad_NO.t().mm(x_NK)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_NO.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight_OK: torch.Tensor, bias_O: Optional[torch.Tensor] = None, gelu_tanh: bool = False,
           onednn: bool = True) -> torch.Tensor:
    """F.linear(x, weight, bias), then GELU (tanh approximation) if asked, through oneDNN where it applies.

    x (..., K) → (..., O). Without autograd the GELU is fused into the matmul.
    """
    if not (onednn and onednn_applies(x) and weight_OK.dtype == torch.float32 and weight_OK.is_contiguous() and x.numel() > 0):
        y = F.linear(x, weight_OK, bias_O)
        return F.gelu(y, approximate='tanh') if gelu_tanh else y
    x_NK = x.reshape(-1, x.shape[-1])
    if not x_NK.is_contiguous():
        x_NK = x_NK.contiguous()
    grad = torch.is_grad_enabled() and (x.requires_grad or weight_OK.requires_grad or (bias_O is not None and bias_O.requires_grad))
    if not grad:
        y_NO = _onednn_linear(x_NK, weight_OK, bias_O, gelu_tanh)
    else:
        y_NO = _OneDNNLinear.apply(x_NK, weight_OK, bias_O)
        if gelu_tanh:
            y_NO = F.gelu(y_NO, approximate='tanh')
    return y_NO.view(*x.shape[:-1], weight_OK.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) computed by `linear`: oneDNN for float32 on the CPU."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, onednn=self.onednn)
