"""The tokenizer weights every script reads: a plain weight file (models/weights.py), a train_vae.py checkpoint, or
the bare name of a published file, downloaded once per machine."""
from typing import Dict, Tuple

import torch

import dist
from models.hub import resolve_checkpoint
from models.weights import load_weights
from utils.ckpt import verify_checksum

__all__ = ['load_tokenizer_state']


def load_tokenizer_state(path_or_name: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(tokenizer state dict, local path it was read from): the one way every script reads tokenizer weights.

    path_or_name: a .safetensors or .pth state dict, a train_vae.py checkpoint (its trainer's vae_wo_ddp, after
    verifying its payload checksum), or the bare name of a published file, downloaded once per machine (by the local
    master; the other processes wait for it) through models.hub.resolve_checkpoint.
    """
    if dist.is_local_master():
        path = resolve_checkpoint(path_or_name)
    dist.barrier()
    if not dist.is_local_master():
        path = resolve_checkpoint(path_or_name)
    state = load_weights(path)
    if isinstance(state, dict) and isinstance(state.get('trainer'), dict) and 'vae_wo_ddp' in state['trainer']:
        verify_checksum(state, path)   # a train_vae.py checkpoint
        state = state['trainer']['vae_wo_ddp']
    return state, path
