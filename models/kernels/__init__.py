"""Attention backends of the VAR transformer (attention_dispatch.py; models/attention.py is their public name)."""
from .attention_dispatch import (BACKENDS, BlockCausal, attention, backend_status, block_causal_groups,
                                 choose_backend, describe_backends)

__all__ = ['BACKENDS', 'BlockCausal', 'attention', 'backend_status', 'block_causal_groups', 'choose_backend',
           'describe_backends']
