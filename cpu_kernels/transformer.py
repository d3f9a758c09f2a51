"""The VAR transformer's modules with this package's CPU paths: subclasses of models/basic_var.py's, the same
parameters, buffers and state-dict keys, that `convert` swaps in (a module's class is changed in place).

Each forward computes what its plain parent's does, up to float rounding, calling this package's kernels where they
apply and the parent's ops elsewhere (CUDA, autocast, torch.compile, the fast paths switched off):

    Linear           oneDNN's matmul for float32 on the CPU (matmul.py)
    SharedAdaLin     the same, for the AdaLN projection shared by all blocks
    FFN              in float32 CPU training fc1, GELU and fc2 in one function that recomputes the GELU in the
                     backward instead of keeping it; without autograd the GELU fused into fc1's oneDNN call (matmul.py)
    SelfAttention    CPU teacher forcing from the qkv projection in one autograd function (block_causal.py); the
                     other calls group by group of scales or by the C attention kernel (attention.py)
    AdaLNSelfAttn,   LN(x)·(1 + scale) + shift keeping x, not LN(x), for the training backward (adaln.py)
    AdaLNBeforeHead

Letters: B batch, L tokens, C width, D condition width, H heads, c head dim.
"""
import torch
import torch.nn.functional as F

from models import basic_var

from . import block_causal
from .adaln import ada_layer_norm
from .attention import attention
from .matmul import Linear, linear, mlp_gelu

__all__ = ['Linear', 'SharedAdaLin', 'FFN', 'SelfAttention', 'AdaLNSelfAttn', 'AdaLNBeforeHead']


class SharedAdaLin(basic_var.SharedAdaLin):
    """SharedAdaLin computed by `linear`: cond (B, D) → (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return linear(cond_BD, self.weight, self.bias).view(-1, 1, 6, C)


class FFN(basic_var.FFN):
    """fc2(GELU_tanh(fc1(x))) by matmul.mlp_gelu: flash-attn's fused MLP where the plain FFN takes it, else the CPU paths."""

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.drop(mlp_gelu(x_BLC, self.fc1, self.fc2, self.fused_if_available, self.training))


class SelfAttention(basic_var.SelfAttention):
    """SelfAttention whose CPU teacher forcing runs from the qkv layout in one function (block_causal.py), other
    calls through attention.attention."""

    def forward(self, x_BLC: torch.Tensor, attn_bias) -> torch.Tensor:
        """x (B, L, C); attn_bias None, a mask broadcastable to (B, H, L, S) or a models.attention.BlockCausal → (B, L, C)."""
        B, L, C = x_BLC.shape
        qkv_BL3Hc = linear(x_BLC, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
                           ).view(B, L, 3, self.num_heads, self.head_dim)
        scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp() if self.attn_l2_norm else None
        dropout_p = self.attn_drop if self.training else 0.0
        if not self.caching and block_causal.applies(qkv_BL3Hc, attn_bias, dropout_p, self.backend):
            # the L2 norm, attention by groups of scales and the heads' merge in one kernel, from and to these layouts
            oup_BLC = block_causal.block_causal_self_attention(qkv_BL3Hc, scale_mul_1H11, self.scale, attn_bias)
            return self.proj_drop(self.proj(oup_BLC))
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(dim=0)
        if self.attn_l2_norm:
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11)
            k_BHLc = F.normalize(k_BHLc, dim=-1)
        if self.caching:
            k_BHLc, v_BHLc = self._append_to_cache(k_BHLc, v_BHLc)   # B, H, S, c
        oup_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, scale=self.scale, attn_bias=attn_bias, dropout_p=dropout_p, backend=self.backend)
        return self.proj_drop(self.proj(oup_BHLc.transpose(1, 2).reshape(B, L, -1)))


class AdaLNSelfAttn(basic_var.AdaLNSelfAttn):
    """AdaLNSelfAttn whose two adaptive layer norms keep their input, not LN(x), for the training backward."""

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias) -> torch.Tensor:
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)  # 6 × (B, 1, C)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(ada_layer_norm(self.ln_wo_grad, x, scale1, shift1), attn_bias=attn_bias).mul_(gamma1))
        x = x + self.drop_path(self.ffn(ada_layer_norm(self.ln_wo_grad, x, scale2, shift2)).mul(gamma2))
        return x


class AdaLNBeforeHead(basic_var.AdaLNBeforeHead):
    """AdaLNBeforeHead whose adaptive layer norm keeps its input, not LN(x), for the training backward."""

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_layer_norm(self.ln_wo_grad, x_BLC, scale, shift)   # ln(x)·(1 + scale) + shift
