"""Fast kernels of the models, each beside its plain reference path, behind one switch.

The model classes call one function (or a thin nn module with the same parameters and checkpoint keys) per
operation; each picks its fast path where it applies and otherwise runs what the reference runs:

    linear / Linear            oneDNN matmul for float32 on the CPU (matmul.py)
    ada_layer_norm             LN(x)·(1 + scale) + shift; in training it keeps x, not LN(x) (adaln.py)
    mlp_gelu                   flash-attn's fused MLP on CUDA, else two `linear`s; in CPU training one oneDNN function
                               that recomputes the GELU in the backward instead of keeping it (matmul.py)
    conv2d / Conv2d            oneDNN conv in CPU inference whatever the batch size (conv.py)
    conv3x3 / Conv3x3          NNPACK Winograd for wide maps in CPU inference (winograd.py)
    upsample2x_conv3x3         polyphase nearest ×2 + 3×3 conv (upsample.py)
    to_conv_layout, residual_add, in_image_groups   tokenizer memory layout and working set (memory.py)
    attention                  SDPA / flash-attn / xformers / math; block-causal by groups of scales (attention_dispatch.py)
    block_causal               CPU teacher forcing from the qkv projection: L2 norm, attention by groups of scales and
                               heads merged in one autograd function, gradients in the qkv layout (block_causal.py)
    c_attention                the C attention kernel both of the above call where the CPU's rule chooses it, compiled
                               on first use (c_attention.py, csrc/, native.py)

`set_fast_paths(False)` or `with fast_paths(False):` turns every fast path off, process-wide (switch.py);
`describe_choices()` says what runs here and why (logged once when the first tokenizer is built); which kernels a
CPU takes is one table in choices.py (vendor, ISA flags, cores; never timing).
"""
from . import block_causal
from .adaln import ada_layer_norm
from .attention_dispatch import (BACKENDS, BlockCausal, attention, backend_status, block_causal_groups,
                                 choose_backend, describe_backends)
from .choices import describe_choices, log_choices_once
from .conv import Conv2d, conv2d
from .matmul import Linear, linear, mlp_gelu
from .memory import channels_last_pays, in_image_groups, residual_add, to_conv_layout
from .switch import fast_paths, fast_paths_enabled, set_fast_paths
from .upsample import upsample2x_conv3x3
from .winograd import Conv3x3, conv3x3, norm_silu_conv3x3

__all__ = ['block_causal', 'ada_layer_norm', 'fast_paths', 'set_fast_paths', 'fast_paths_enabled', 'describe_choices', 'log_choices_once',
           'Linear', 'linear', 'mlp_gelu', 'Conv2d', 'conv2d', 'Conv3x3', 'conv3x3', 'norm_silu_conv3x3', 'upsample2x_conv3x3',
           'channels_last_pays', 'to_conv_layout', 'residual_add', 'in_image_groups',
           'BACKENDS', 'BlockCausal', 'attention', 'backend_status', 'block_causal_groups', 'choose_backend',
           'describe_backends']
