"""Plain weight files (a state dict, nothing else): safetensors, or a .pth read with weights_only=True.

safetensors is the format this project writes for weights (loading it never runs code); .pth is read for
the published files and for older exports. Training checkpoints are not plain weights: see utils/ckpt.py.
"""
import os
from typing import Dict, Mapping, Optional, Tuple

import torch

from utils.ckpt import _fsync_dir, _tmp_name, verify_checksum

__all__ = ['load_weights', 'save_weights', 'load_tokenizer_state', 'SAFETENSORS_SUFFIX']

SAFETENSORS_SUFFIX = '.safetensors'


def load_weights(path: str, device: str = 'cpu') -> Dict[str, torch.Tensor]:
    """The state dict in `path`: a .safetensors file, or any other file read by torch.load(weights_only=True)."""
    if str(path).endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load_file
        return load_file(str(path), device=str(device))
    return torch.load(path, map_location=device, weights_only=True)


def load_tokenizer_state(path_or_name: str) -> Tuple[Dict[str, torch.Tensor], str]:
    """(tokenizer state dict, local path it was read from): the one way every script reads tokenizer weights.

    path_or_name: a .safetensors or .pth state dict, a train_vae.py checkpoint (its trainer's vae_wo_ddp, after
    verifying its payload checksum), or the bare name of a published file, downloaded once per machine (by the local
    master; the other processes wait for it) through utils.hub.resolve_checkpoint.
    """
    import dist
    from utils.hub import resolve_checkpoint
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


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors: temporary file, fsync, rename (a kill never leaves a partial file).

    Tensors are stored contiguous (channels-last conv weights included); tensors sharing memory are stored
    once each, as copies, so that the file loads back with every key.
    """
    from safetensors.torch import save_file
    if not str(path).endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f'{path}: a safetensors file name must end with {SAFETENSORS_SUFFIX}')
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f'{k}: {type(v).__name__} is not a tensor; only plain state dicts are weight files')
        v = v.detach().to('cpu').contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
            ptr = v.untyped_storage().data_ptr()
        if ptr is not None:
            seen.add(ptr)
        tensors[k] = v
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(str(path))
    try:
        save_file(tensors, tmp, metadata={'format': 'pt', **(metadata or {})})
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
