"""The attention backends of the VAR transformer (SDPA, math, flash-attn, xformers, FlexAttention) and the block-causal
mask over scales: the public name of models/kernels/attention_dispatch.py and flex.py, where they are defined for now."""
from .kernels import flex
from .kernels.attention_dispatch import (BACKENDS, BlockCausal, attention, backend_status, block_causal_groups,
                                         block_causal_key_ends, choose_backend, describe_backends, flash_attn_func,
                                         flex_available, flex_block_mask, xformers_attn_func)

__all__ = ['BACKENDS', 'BlockCausal', 'attention', 'backend_status', 'block_causal_groups', 'block_causal_key_ends',
           'choose_backend', 'describe_backends', 'flash_attn_func', 'flex', 'flex_available', 'flex_block_mask',
           'xformers_attn_func']
