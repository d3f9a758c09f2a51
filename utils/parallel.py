"""Data parallelism behind one seam: DDP (the default) or fully sharded FSDP2 (--fsdp=1).

The training loop, the trainers and the optimizer wrapper call these functions and never ask which one is on:
`wrap_for_training` shards (each transformer block, then the root, with FSDP2's MixedPrecisionPolicy: float32
gathers and reductions, autocast for --fp16) or wraps in DDP; `grad_sync` is DDP's no_sync or FSDP2's
set_requires_gradient_sync / set_reshard_after_backward for the micro steps of a gradient accumulation; `clip_grad_norm` takes the norm over every shard; `nonfinite_names` checks
every shard; `full_state_dict` gathers a sharded model for an export; `lockstep_batches` keeps the processes'
forward passes (collectives under FSDP) in step when their validation shards differ in length.
"""
import contextlib
import logging
import sys
import warnings
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

import dist

__all__ = ['checkpoint_store', 'is_sharded', 'sharding_on', 'wrap_for_training', 'grad_sync', 'reshard', 'clip_grad_norm', 'local',
           'nonfinite_names', 'full_state_dict', 'lockstep_batches']

logger = logging.getLogger(__name__)



def is_dtensor(t) -> bool:
    """Whether t is a DTensor (an FSDP2 shard). No tensor is one unless FSDP2 has loaded torch.distributed.tensor, whose
    import (sympy and the symbolic-shape machinery) every script would otherwise pay for at start."""
    module = sys.modules.get('torch.distributed.tensor')
    return module is not None and isinstance(t, module.DTensor)

def sharding_on(args) -> bool:
    """--fsdp=1 with more than one process (one process has nothing to shard: it trains unwrapped, checkpoints in DCP's format)."""
    return bool(getattr(args, 'fsdp', 0)) and dist.get_world_size() > 1


def checkpoint_store(args):
    """Where checkpoints go: DCP folders with --fsdp=1 (any number of processes: they reshard), else one .pth file."""
    if getattr(args, 'fsdp', 0):
        from utils.dcp_ckpt import ShardedStore
        return ShardedStore()
    from utils.ckpt import FileStore
    return FileStore()


def is_sharded(module: nn.Module) -> bool:
    """Whether the module's parameters are FSDP2 shards (DTensors)."""
    return any(is_dtensor(p) for p in module.parameters())


def _mp_policy():
    """Weights gathered, and gradients reduced, in float32; --fp16=1/2 compute in float16/bfloat16 through autocast, as under DDP.

    A policy with param_dtype=bfloat16 would halve the gathers, but VAR computes its embeddings in float32 outside autocast
    and validates in float32 (as the reference does): with low-precision weights those fail, and training drifts from DDP's
    (4e-3 relative on the weights after 24 steps of the tiny test model, against 0 with this policy).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def wrap_for_training(model: nn.Module, args, device: torch.device, blocks: Sequence[nn.Module] = (),
                      forward_methods: Sequence[str] = ()) -> nn.Module:
    """The module the training step calls. --fsdp=1 on several processes: `model` itself, each of `blocks` and then the
    root sharded in place with fully_shard (the optimizer must be built after this); `forward_methods` (e.g. sampling)
    all-gather the weights as forward does. Else DDP in a process group, or the model as it is."""
    if sharding_on(args):
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        # FSDP2's notes on what this code does on purpose: the float16 loss scaler's one-element tensors on shards, and
        # VAR's logits (a view) leaving the root, never changed in place
        warnings.filterwarnings('ignore', message='Found a non-scalar tensor with numel=1')
        warnings.filterwarnings('ignore', message='FSDP2-wrapped module .* returned a view tensor')
        mp = _mp_policy()
        for i, block in enumerate(blocks):   # the last block's weights are needed again at once by the backward
            fully_shard(block, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mp_policy=mp)
        for name in forward_methods:
            register_fsdp_forward_method(model, name)
        return model
    if dist.initialized():
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=False,
                   broadcast_buffers=False)
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, stepping: bool) -> Iterator[None]:
    """Around one micro step: gradients are reduced over the processes only on the optimizer step (stepping);
    under FSDP2 the weights also stay gathered, and the gradients unsharded, between the micro steps of an accumulation."""
    if hasattr(model, 'set_requires_gradient_sync'):   # an FSDP2 module
        model.set_requires_gradient_sync(stepping)
        model.set_reshard_after_backward(stepping)
        yield
    elif not stepping and hasattr(model, 'no_sync'):   # DDP
        with model.no_sync():
            yield
    else:
        yield


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of `model` back in its sharded state. A forward without gradients (validation) leaves the root's
    weights gathered, and while they are, `parameters()` yields the gathered tensors instead of the shards: call this before
    anything reads or swaps parameters (EMA, checkpoints)."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip the gradients to the global norm max_norm (inf: no clipping); the norm before clipping, over every shard."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False)
    if is_dtensor(total):   # a partial norm on each shard: reduced over the processes
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: in-place changes reach the parameter), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def nonfinite_names(modules: Dict[str, nn.Module]) -> List[str]:
    """'<module>.<parameter>' of every parameter with a non-finite value on any process's shard (collective when sharded)."""
    names, flags = [], []
    for name, m in modules.items():
        for n, p in m.named_parameters():
            names.append(f'{name}.{n}')
            flags.append(~torch.isfinite(local(p.detach())).all())
    if not flags:
        return []
    bad = torch.stack(flags).float().cpu()
    if any(is_sharded(m) for m in modules.values()):
        dist.allreduce(bad)
    return [n for n, b in zip(names, bad.tolist()) if b]


def full_state_dict(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The module's full state dict on the CPU for an export: on rank 0 when sharded (a collective: every process calls it,
    the others get None), else the plain state dict."""
    if not is_sharded(module):
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.is_master() else None


def lockstep_batches(loader: DataLoader, sharded: bool) -> Iterable[Tuple[object, bool]]:
    """(batch, counted) for each batch of the loader; when sharded, every process runs as many forward passes as the one with
    the most batches (FSDP2 gathers weights in each): the others repeat a batch, not counted."""
    n_mine = len(loader)
    last = None
    for batch in loader:
        last = batch
        yield batch, True
    if not sharded:
        return
    n_max = torch.tensor([float(n_mine)])
    dist.allreduce(n_max, op=torch.distributed.ReduceOp.MAX)
    if int(n_max.item()) > n_mine and last is None:   # this process has no validation image at all
        last = default_collate([loader.dataset[0]])
    for _ in range(int(n_max.item()) - n_mine):
        yield last, False
