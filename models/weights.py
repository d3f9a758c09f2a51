"""Plain weight files (a state dict, nothing else): safetensors, or a .pth read with weights_only=True; and the
atomic writes of the files a saved model folder holds.

safetensors is the format this project writes for weights (loading it never runs code); .pth is read for
the published files and for older exports. Training checkpoints are not plain weights: see utils/ckpt.py.
"""
import os
import socket
from typing import Callable, Dict, Mapping, Optional

import torch
from safetensors.torch import load_file, save_file

__all__ = ['load_weights', 'save_weights', 'write_atomic', 'temporary_name', 'fsync_dir', 'SAFETENSORS_SUFFIX']

SAFETENSORS_SUFFIX = '.safetensors'


def load_weights(path: str, device: str = 'cpu') -> Dict[str, torch.Tensor]:
    """The state dict in `path`: a .safetensors file, or any other file read by torch.load(weights_only=True)."""
    if str(path).endswith(SAFETENSORS_SUFFIX):
        return load_file(str(path), device=str(device))
    return torch.load(path, map_location=device, weights_only=True)


def temporary_name(path: str) -> str:
    # <name>.tmp-<host>-<pid>: the temporary names utils.ckpt.remove_stale_temps deletes after a killed run
    return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) writes the file under a temporary name beside `path`; it is then fsynced and renamed, so neither a
    kill nor a power loss leaves a partial `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_name(str(path))
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights(state_dict: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors, atomically (write_atomic).

    Tensors are stored contiguous (channels-last conv weights included); tensors sharing memory are stored
    once each, as copies, so that the file loads back with every key.
    """
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
    write_atomic(str(path), lambda tmp: save_file(tensors, tmp, metadata={'format': 'pt', **(metadata or {})}))
