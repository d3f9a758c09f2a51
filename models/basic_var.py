"""Transformer blocks of VAR: self-attention with a KV cache, FFN, adaptive layer norm.

Letters: B batch, L tokens (of all scales fed so far), C width, D condition width, H heads,
c head dim (C / H), S cached key tokens.
"""
import functools
import importlib
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import BACKENDS, attention
from .helpers import DropPath

__all__ = ['FFN', 'SelfAttention', 'AdaLNSelfAttn', 'AdaLNBeforeHead', 'SharedAdaLin', 'fused_mlp_func']


@functools.lru_cache(maxsize=None)
def fused_mlp_func() -> Optional[Callable]:
    """flash_attn.ops.fused_dense.fused_mlp_func if installed and importable, else None (an optional library)."""
    try:
        return importlib.import_module('flash_attn.ops.fused_dense').fused_mlp_func
    except Exception:  # flash-attn without its fused_dense extension, or not installed
        return None


class FFN(nn.Module):
    """fc1 (C → 4C), GELU (tanh approximation), fc2."""

    def __init__(self, in_features: int, hidden_features: int = None, out_features: int = None,
                 drop: float = 0.0, fused_if_available: bool = True):
        super().__init__()
        self.fused_if_available = fused_if_available
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop, inplace=True) if drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        # flash-attn's fused MLP on CUDA where installed and allowed, as in the reference; not under torch.compile,
        # where its extension would break the graph and the compiler fuses the GELU itself
        fused = fused_mlp_func() if (self.fused_if_available and x_BLC.is_cuda and not torch.compiler.is_compiling()) else None
        if fused is not None:
            return self.drop(fused(x=x_BLC, weight1=self.fc1.weight, weight2=self.fc2.weight, bias1=self.fc1.bias,
                                   bias2=self.fc2.bias, activation='gelu_approx', save_pre_act=self.training,
                                   return_residual=False, checkpoint_lvl=0, heuristic=0, process_group=None))
        return self.drop(self.fc2(F.gelu(self.fc1(x_BLC), approximate='tanh')))


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/v biases, optional L2-normalised q·k and a KV cache for sampling."""

    def __init__(self, block_idx: int, embed_dim: int = 768, num_heads: int = 12, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, attn_l2_norm: bool = False, backend: str = 'sdpa'):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        if backend not in BACKENDS:
            raise ValueError(f'attention backend {backend!r} is not one of {BACKENDS}')
        self.block_idx, self.num_heads, self.head_dim = block_idx, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if self.attn_l2_norm:
            self.scale = 1
            self.scale_mul_1H11 = nn.Parameter(torch.full(size=(1, self.num_heads, 1, 1), fill_value=4.0).log(), requires_grad=True)
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)

        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer('zero_k_bias', torch.zeros(embed_dim))

        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop, inplace=True) if proj_drop > 0 else nn.Identity()
        self.attn_drop: float = attn_drop
        self.backend = backend

        # KV cache, used only while sampling: cached_k / cached_v (B, H, S, c) hold the keys and values so far
        self.caching, self.cached_k, self.cached_v = False, None, None
        self.cache_capacity, self._kv_buffers = 0, None

    def kv_caching(self, enable: bool, capacity: int = 0) -> None:
        """Start (or stop) caching keys and values. capacity > 0: the number of tokens to come, for which the cache is
        allocated once at the first call (no copy of the cache so far at each scale; more tokens than that: an error)."""
        self.caching, self.cached_k, self.cached_v = enable, None, None
        self.cache_capacity, self._kv_buffers = (capacity if enable else 0), None

    @property
    def kv_buffers(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The key and value caches (B, H, capacity, c) of kv_caching(True, capacity), once the first tokens came."""
        return self._kv_buffers

    def kv_cache_into(self, kv_buffers: Tuple[torch.Tensor, torch.Tensor], filled: int) -> None:
        """Cache into these key and value caches (B, H, capacity, c), whose first `filled` tokens are the keys and
        values so far: for a caller that keeps one cache at fixed addresses across sampling calls (CUDA graphs)."""
        k_BHSc, v_BHSc = kv_buffers
        self.caching, self.cache_capacity, self._kv_buffers = True, k_BHSc.shape[2], (k_BHSc, v_BHSc)
        self.cached_k, self.cached_v = (k_BHSc[:, :, :filled], v_BHSc[:, :, :filled]) if filled else (None, None)

    def _append_to_cache(self, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token so far, these included: (B, H, S, c) each."""
        if not self.cache_capacity:   # no capacity given: the cache grows by concatenation, as in the reference
            if self.cached_k is not None:
                k_BHLc, v_BHLc = torch.cat((self.cached_k, k_BHLc), dim=2), torch.cat((self.cached_v, v_BHLc), dim=2)
            self.cached_k, self.cached_v = k_BHLc, v_BHLc
            return k_BHLc, v_BHLc
        begin = 0 if self.cached_k is None else self.cached_k.shape[2]
        end = begin + k_BHLc.shape[2]
        if end > self.cache_capacity:
            raise RuntimeError(f'the KV cache holds {self.cache_capacity} tokens and {end} were fed: pass the number of '
                               'tokens to come as kv_caching(True, capacity)')
        if self._kv_buffers is None:
            B, H, _, c = k_BHLc.shape
            self._kv_buffers = tuple(t.new_empty(B, H, self.cache_capacity, c) for t in (k_BHLc, v_BHLc))
        for buffer_BHSc, new_BHLc in zip(self._kv_buffers, (k_BHLc, v_BHLc)):
            buffer_BHSc[:, :, begin:end].copy_(new_BHLc)
        self.cached_k, self.cached_v = (buffer_BHSc[:, :, :end] for buffer_BHSc in self._kv_buffers)
        return self.cached_k, self.cached_v

    def forward(self, x_BLC: torch.Tensor, attn_bias) -> torch.Tensor:
        """x (B, L, C); attn_bias None, a mask broadcastable to (B, H, L, S) or an attention.BlockCausal → (B, L, C)."""
        B, L, C = x_BLC.shape
        qkv_BL3Hc = F.linear(x_BLC, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
                             ).view(B, L, 3, self.num_heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(dim=0)
        if self.attn_l2_norm:
            scale_mul_1H11 = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11)
            k_BHLc = F.normalize(k_BHLc, dim=-1)

        if self.caching:
            k_BHLc, v_BHLc = self._append_to_cache(k_BHLc, v_BHLc)   # B, H, S, c

        dropout_p = self.attn_drop if self.training else 0.0
        oup_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, scale=self.scale, attn_bias=attn_bias, dropout_p=dropout_p, backend=self.backend)
        return self.proj_drop(self.proj(oup_BHLc.transpose(1, 2).reshape(B, L, -1)))

    def extra_repr(self) -> str:
        return f'attn_l2_norm={self.attn_l2_norm}, backend={self.backend}'


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose layer norms are scaled and shifted, and whose branches gated, by the class condition."""

    def __init__(self, block_idx: int, last_drop_p: float, embed_dim: int, cond_dim: int, shared_aln: bool,
                 norm_layer, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, attn_l2_norm: bool = False, attn_backend: str = 'sdpa',
                 fused_if_available: bool = True):
        super().__init__()
        self.block_idx, self.last_drop_p, self.C = block_idx, last_drop_p, embed_dim
        self.C, self.D = embed_dim, cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.attn = SelfAttention(block_idx=block_idx, embed_dim=embed_dim, num_heads=num_heads, attn_drop=attn_drop,
                                  proj_drop=drop, attn_l2_norm=attn_l2_norm, backend=attn_backend)
        self.ffn = FFN(in_features=embed_dim, hidden_features=round(embed_dim * mlp_ratio), drop=drop,
                       fused_if_available=fused_if_available)

        self.ln_wo_grad = norm_layer(embed_dim, elementwise_affine=False)
        self.shared_aln = shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias) -> torch.Tensor:
        """x (B, L, C); cond_BD (B, D), or (B, 1, 6, C) from the shared AdaLN → (B, L, C)."""
        if self.shared_aln:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond_BD).unbind(2)  # 6 × (B, 1, C)
        else:
            gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias=attn_bias).mul_(gamma1))
        x = x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))
        return x

    def extra_repr(self) -> str:
        return f'shared_aln={self.shared_aln}'


class AdaLNBeforeHead(nn.Module):
    """Condition-dependent scale and shift of the final layer norm."""

    def __init__(self, C: int, D: int, norm_layer):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = norm_layer(C, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """One AdaLN projection shared by all blocks: cond (B, D) → (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)
