"""The attention backends of the VAR transformer (SDPA, math, flash-attn, xformers) and the block-causal mask over
scales: the public name of models/kernels/attention_dispatch.py, where they are defined for now."""
from .kernels.attention_dispatch import (BACKENDS, BlockCausal, attention, backend_status, block_causal_groups,
                                         block_causal_key_ends, choose_backend, describe_backends, flash_attn_func,
                                         xformers_attn_func)

__all__ = ['BACKENDS', 'BlockCausal', 'attention', 'backend_status', 'block_causal_groups', 'block_causal_key_ends',
           'choose_backend', 'describe_backends', 'flash_attn_func', 'xformers_attn_func']
