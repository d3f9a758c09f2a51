"""Every collective of the project goes through here; without a process group each function is a no-op.

Distributed mode is detected from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK):
nccl on CUDA, gloo on the CPU. A plain `python script.py` runs as one process.
"""
import datetime
import logging
import os
import socket
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as tdist

__all__ = ['initialize', 'initialized', 'describe', 'get_rank', 'get_local_rank', 'get_world_size', 'get_device', 'is_master',
           'is_local_master', 'barrier', 'allreduce', 'broadcast', 'all_gather_object', 'broadcast_object', 'finalize',
           'local_group_envs']

logger = logging.getLogger(__name__)

_device: Optional[torch.device] = None


def initialize(backend: Optional[str] = None, timeout_minutes: float = 30, force_cpu: bool = False) -> torch.device:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    global _device
    use_cuda = torch.cuda.is_available() and not force_cpu
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        _device = torch.device('cuda', torch.cuda.current_device())
    else:
        _device = torch.device('cpu')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1 and not tdist.is_initialized():
        backend = backend or ('nccl' if use_cuda else 'gloo')
        kw = dict(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
        if backend == 'nccl':
            kw['device_id'] = _device
        try:
            tdist.init_process_group(**kw)
        except TypeError:  # torch without device_id
            kw.pop('device_id', None)
            tdist.init_process_group(**kw)
    return _device


def describe() -> str:
    """One line on the process group, for the log."""
    if not initialized():
        return f'single process on {get_device()}'
    return f'process group: rank {get_rank()} of {get_world_size()}, backend {tdist.get_backend()}, device {get_device()}'


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if initialized() else 0


def get_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', 0)) if initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def get_device() -> torch.device:
    return _device if _device is not None else torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def is_master() -> bool:
    return get_rank() == 0


def is_local_master() -> bool:
    return get_local_rank() == 0


def barrier() -> None:
    if initialized():
        tdist.barrier()


def allreduce(t: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) a tensor over all processes in place; returns it."""
    if initialized():
        if t.is_cuda or tdist.get_backend() != 'nccl':
            tdist.all_reduce(t, op=op or tdist.ReduceOp.SUM)
        else:  # nccl needs the tensor on the GPU
            cu = t.to(get_device())
            tdist.all_reduce(cu, op=op or tdist.ReduceOp.SUM)
            t.copy_(cu.cpu())
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if initialized():
        if t.is_cuda or tdist.get_backend() != 'nccl':
            tdist.broadcast(t, src=src)
        else:
            cu = t.to(get_device())
            tdist.broadcast(cu, src=src)
            t.copy_(cu.cpu())
    return t


def all_gather_object(obj: Any) -> List[Any]:
    if not initialized():
        return [obj]
    out = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def finalize() -> None:
    if initialized():
        tdist.destroy_process_group()


def local_group_envs(procs: int, base: Optional[Dict[str, str]] = None) -> List[Dict[str, str]]:
    """The environment torchrun gives each of `procs` processes of one group on this machine (rank by rank: RANK,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT on 127.0.0.1), on top of `base`
    (default: this process's environment): for launching a group without torchrun's agent (benchmarks, tests)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return [dict(os.environ if base is None else base, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs),
                 LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)) for rank in range(procs)]
