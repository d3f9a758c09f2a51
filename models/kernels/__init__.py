"""Attention backends of the VAR transformer (attention_dispatch.py, flex.py; models/attention.py is their public name)."""
from . import flex
from .attention_dispatch import (BACKENDS, BlockCausal, attention, backend_status, block_causal_groups,
                                 choose_backend, describe_backends, flex_available, flex_block_mask)

__all__ = ['BACKENDS', 'BlockCausal', 'attention', 'backend_status', 'block_causal_groups', 'choose_backend',
           'describe_backends', 'flex', 'flex_available', 'flex_block_mask']
