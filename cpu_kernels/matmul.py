"""Linear layers and the transformer's MLP: oneDNN's matmul on the CPU, flash-attn's fused MLP on CUDA, F.linear as reference.

oneDNN (fast path, CPU float32). PyTorch computes a float32 `F.linear` and its gradients on the CPU with MKL
(`addmm`/`mm`), and MKL takes its AVX2 code on AMD CPUs, AVX-512 ones included. oneDNN's matmul
(`torch.ops.mkldnn._linear_pointwise`, which torch.compile's CPU backend calls) uses the CPU's AVX-512, adds the bias
in its epilogue and can apply the FFN's GELU there too. The input gradient and the weight gradient go through oneDNN
as well. Results differ from MKL's by float rounding (~1e-6 relative). Used for float32 on the CPU with autocast off
(bf16/fp16 autocast, torch.compile and CUDA keep F.linear), when this PyTorch build has oneDNN, the fast paths are on
(switch.py) and the CPU's rule chooses it (cpu_rules.py: `onednn_linear`, applied in choices.py).

flash-attn's fused MLP (CUDA, as in the reference): fc1, GELU and fc2 in one kernel when flash-attn's
fused_dense extension is installed and the model was built with fused_if_available (the reference's own
option, not this package's switch).

Letters: N rows (all leading dimensions together), K input features, O output features.
"""
import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.basic_var import fused_mlp_func

from .choices import cpu_rule
from .switch import SWITCH, compiling, plain_cpu_float32

__all__ = ['Linear', 'linear', 'linear_reference', 'mlp_gelu', 'onednn_applies', 'onednn_available', 'ACTIVATIONS']

ACTIVATIONS = (None, 'gelu_tanh')


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether oneDNN's linear runs here (PyTorch built with oneDNN, an x86 or ARM CPU it supports)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w = torch.ones(2, 3, device='cpu'), torch.ones(4, 3, device='cpu')   # explicit: may run inside `with torch.device(...)`
        return bool(torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, None, 'none', [], ''), F.linear(x, w)))
    except (AttributeError, RuntimeError):
        return False


def onednn_applies(x: torch.Tensor) -> bool:
    """Whether `x` may go through oneDNN: float32 on the CPU, autocast off, not under torch.compile, oneDNN present and
    chosen for this CPU (choices.py)."""
    return plain_cpu_float32(x) and cpu_rule().onednn_linear and onednn_available()


def linear_reference(x: torch.Tensor, weight_OK: torch.Tensor, bias_O: Optional[torch.Tensor] = None,
                     act: Optional[str] = None) -> torch.Tensor:
    """The plain path: F.linear, then GELU (tanh approximation) for act='gelu_tanh'."""
    y = F.linear(x, weight_OK, bias_O)
    return F.gelu(y, approximate='tanh') if act == 'gelu_tanh' else y


def _onednn_linear(x_NK: torch.Tensor, weight_OK: torch.Tensor, bias_O: Optional[torch.Tensor], gelu_tanh: bool = False) -> torch.Tensor:
    if gelu_tanh:
        return torch.ops.mkldnn._linear_pointwise(x_NK, weight_OK, bias_O, 'gelu', [], 'tanh')
    return torch.ops.mkldnn._linear_pointwise(x_NK, weight_OK, bias_O, 'none', [], '')


def _onednn_weight_grad(grad_NO: torch.Tensor, x_NK: torch.Tensor) -> torch.Tensor:
    """grad_NOᵀ · x_NK → (O, K) by oneDNN, reading both operands transposed in place (no copy of either).

    oneDNN runs it fastest with the wider of O and K as its `weight` (output) side: for O >= K it computes
    (x_NKᵀ · grad_NO) = grad_wᵀ and transposes that small (K, O) result, else grad_w directly.
    """
    if grad_NO.shape[1] >= x_NK.shape[1]:
        return _onednn_linear(x_NK.t(), grad_NO.t(), None).t().contiguous()
    return _onednn_linear(grad_NO.t(), x_NK.t(), None)


def _onednn_input_grad(grad_NO: torch.Tensor, weight_OK: torch.Tensor) -> torch.Tensor:
    """grad_NO · weight_OK → (N, K) by oneDNN, its `weight` operand the transposed view of weight_OK: oneDNN reorders
    its weight operand anyway, so a contiguous copy first would be a second copy of the weight (the same bits either
    way)."""
    return _onednn_linear(grad_NO, weight_OK.t(), None)


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
            grad_x = _onednn_input_grad(grad_NO, weight_OK)
        if ctx.needs_input_grad[1]:
            grad_w = _onednn_weight_grad(grad_NO, x_NK)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_NO.sum(0)
        return grad_x, grad_w, grad_b


class _GemmOps:
    """The three GEMMs of a linear layer and its gradients, by oneDNN or by PyTorch's own (MKL) kernels, the latter
    being exactly the calls autograd makes for F.linear (so its results are F.linear's, bit for bit)."""

    def __init__(self, onednn: bool):
        self.onednn = onednn

    def forward(self, x_NK, weight_OK, bias_O):
        return _onednn_linear(x_NK, weight_OK, bias_O) if self.onednn else F.linear(x_NK, weight_OK, bias_O)

    def input_grad(self, grad_NO, weight_OK):
        return _onednn_input_grad(grad_NO, weight_OK) if self.onednn else grad_NO.mm(weight_OK)

    def weight_grad(self, grad_NO, x_NK):
        return _onednn_weight_grad(grad_NO, x_NK) if self.onednn else grad_NO.t().mm(x_NK)


class _MLPRecomputingGelu(torch.autograd.Function):
    """fc2(GELU_tanh(fc1(x))) for training: the same ops as two linear layers and F.gelu in both passes (so the same
    numbers, bit for bit), but it keeps only fc1's input and output for the backward and recomputes the GELU there
    (one elementwise pass) instead of also keeping the GELU's output: 4C floats fewer per token and block (170 MiB
    for the d8 step at batch 4). The GEMMs go by oneDNN where `linear` would, else by F.linear's own kernels.
    Letters: N rows, C width, F hidden width."""

    @staticmethod
    def forward(ctx, x_NC, w1_FC, b1_F, w2_CF, b2_C, gemm: _GemmOps):
        h_NF = gemm.forward(x_NC, w1_FC, b1_F)
        ctx.save_for_backward(x_NC, h_NF, w1_FC, w2_CF)
        ctx.has_bias, ctx.gemm = (b1_F is not None, b2_C is not None), gemm
        return gemm.forward(F.gelu(h_NF, approximate='tanh'), w2_CF, b2_C)

    @staticmethod
    def backward(ctx, grad_NC):
        x_NC, h_NF, w1_FC, w2_CF = ctx.saved_tensors
        gemm, grad_NC = ctx.gemm, grad_NC.contiguous()
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        grad_w2 = gemm.weight_grad(grad_NC, F.gelu(h_NF, approximate='tanh')) if need_w2 else None
        grad_b2 = grad_NC.sum(0) if ctx.has_bias[1] and need_b2 else None
        grad_h_NF = torch.ops.aten.gelu_backward(gemm.input_grad(grad_NC, w2_CF), h_NF, approximate='tanh')
        grad_w1 = gemm.weight_grad(grad_h_NF, x_NC) if need_w1 else None
        grad_b1 = grad_h_NF.sum(0) if ctx.has_bias[0] and need_b1 else None
        grad_x = gemm.input_grad(grad_h_NF, w1_FC) if need_x else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


_GEMM = {True: _GemmOps(onednn=True), False: _GemmOps(onednn=False)}


def linear(x: torch.Tensor, weight_OK: torch.Tensor, bias_O: Optional[torch.Tensor] = None,
           act: Optional[str] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), then `act` (None or 'gelu_tanh'), through oneDNN where it applies.

    x (..., K) → (..., O). Without autograd the GELU is fused into the matmul.
    """
    gelu_tanh = act is not None
    if gelu_tanh and act != 'gelu_tanh':
        raise ValueError(f'linear: act={act!r} is not one of {ACTIVATIONS}')
    if not (SWITCH.on and onednn_applies(x) and weight_OK.dtype == torch.float32 and weight_OK.is_contiguous() and x.numel() > 0):
        y = F.linear(x, weight_OK, bias_O)   # linear_reference, inline: this is every CUDA call's path
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


def mlp_gelu(x_BLC: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, fused_if_available: bool, training: bool) -> torch.Tensor:
    """fc2(GELU_tanh(fc1(x))): flash-attn's fused MLP on CUDA where installed and allowed; in float32 CPU training with
    the fast paths on, _MLPRecomputingGelu (the same bits, the GELU's output not kept); else two `linear` calls."""
    # not under torch.compile: flash-attn's extension would break the graph, and the compiler fuses the GELU itself
    fused = fused_mlp_func() if (fused_if_available and x_BLC.is_cuda and not compiling()) else None
    if fused is not None:
        return fused(x=x_BLC, weight1=fc1.weight, weight2=fc2.weight, bias1=fc1.bias, bias2=fc2.bias,
                     activation='gelu_approx', save_pre_act=training, return_residual=False, checkpoint_lvl=0,
                     heuristic=0, process_group=None)
    if (SWITCH.on and torch.is_grad_enabled() and plain_cpu_float32(x_BLC) and x_BLC.numel() > 0
            and all(w.dtype == torch.float32 and w.is_contiguous() for w in (fc1.weight, fc2.weight))):
        x_NC = x_BLC.reshape(-1, x_BLC.shape[-1])
        y_NC = _MLPRecomputingGelu.apply(x_NC if x_NC.is_contiguous() else x_NC.contiguous(), fc1.weight, fc1.bias,
                                         fc2.weight, fc2.bias, _GEMM[onednn_applies(x_BLC)])
        return y_NC.view(*x_BLC.shape[:-1], fc2.weight.shape[0])
    return fc2(linear(x_BLC, fc1.weight, fc1.bias, act='gelu_tanh'))


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) computed by `linear`: oneDNN for float32 on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
