"""What every training script shares: set-up, resume, data loaders, checkpoint writing, seeds, logs."""
import json
import logging
import os
import os.path as osp
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

import dist
from utils.ckpt import ConfigMismatchError, copy_atomic, load_first_good, save_atomic
from utils.cli import TrainingStopped
from utils.data_sampler import EvalShardSampler, GlobalBatchSampler
from utils.log import setup_logging

__all__ = ['iteration_seed', 'IterationPlan', 'plan_iterations', 'setup_run', 'resume', 'check_resume_config', 'build_loaders', 'CheckpointWriter', 'append_log',
           'NonFiniteGuard']

logger = logging.getLogger(__name__)


def iteration_seed(seed: int, rank: int, g_it: int) -> int:
    """Seed of the random draws (condition dropout, drop path, ...) at one iteration of one process."""
    return (seed * 0x9E3779B1 + rank * 0x85EBCA6B + g_it * 0xC2B2AE35 + 1) % (2 ** 63 - 1)


@dataclass(frozen=True)
class IterationPlan:
    """Global iteration counts of a run: all of it, the warm-up, where this (maybe resumed) run starts, how often it logs."""
    max_it: int
    wp_it: float
    start_g_it: int
    log_every: int


def plan_iterations(ep: int, wp: float, iters_train: int, start_ep: int, start_it: int) -> Optional[IterationPlan]:
    """The plan of a run of `ep` epochs (`wp` of them warm-up) resumed at (start_ep, start_it); None when it has finished."""
    if start_ep >= ep:
        logger.info('training already finished (%d epochs); nothing to do', ep)
        return None
    return IterationPlan(max_it=ep * iters_train, wp_it=wp * iters_train, start_g_it=start_ep * iters_train + start_it,
                         log_every=max(1, iters_train // 10))


def setup_run(args, out_dir: str) -> torch.device:
    """Join the process group, create the output folder, log to stdout.txt, derive the flags' values."""
    device = dist.initialize()
    if dist.is_local_master():
        os.makedirs(out_dir, exist_ok=True)
    dist.barrier()
    setup_logging(dist.get_rank(), osp.join(out_dir, 'stdout.txt'))
    args.finalize(dist.get_world_size())
    if getattr(args, 'tf32', False) and device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logger.info('command: %s %s', sys.argv[0], args.cmd)
    logger.info('%s', dist.describe())
    return device


def resume(args, out_dir: str, names: Sequence[str], validate: Callable[[Dict], None]) -> Tuple[Optional[Dict], int, int]:
    """(checkpoint or None, start epoch, start iteration); sets args.seed from the checkpoint or draws one."""
    ckpt, ckpt_path = load_first_good([osp.join(out_dir, n) for n in names], validate=validate)
    if ckpt is None:
        if args.seed is None:
            args.seed = dist.broadcast_object(random.SystemRandom().randrange(2 ** 31))
        return None, 0, 0
    saved = ckpt['args']
    args.seed = saved['seed']
    if saved.get('world_size') != dist.get_world_size():
        logger.info('resuming with %d processes (the checkpoint was written with %s): the global batch of %d images per step '
                    'is kept, %d per process and micro step', dist.get_world_size(), saved.get('world_size'), args.bs, args.batch_size)
    if saved.get('bs') != args.bs:
        logger.warning('--bs=%d differs from the checkpoint\'s %s: the data order after the resume point changes', args.bs, saved.get('bs'))
    logger.info('resuming from %s at epoch %d, iteration %d', ckpt_path, ckpt['epoch'], ckpt['iter'])
    return ckpt, ckpt['epoch'], ckpt['iter']


def check_resume_config(saved: Dict, args, keys: Sequence[str], ckpt_name: str) -> None:
    """Stop with the differences when the flags that define the model changed since the checkpoint."""
    diffs = []
    for k in keys:
        a, b = saved.get(k), getattr(args, k)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = tuple(a or ()), tuple(b or ())
        if a != b:
            diffs.append(f'--{k}: checkpoint {a}, now {b}')
    if diffs:
        raise ConfigMismatchError(f'{ckpt_name} was trained with another model configuration: ' + '; '.join(diffs)
                                  + '. Use the same flags to resume, or another --local_out_dir_path to start a new run')


def build_loaders(args, train_set: Dataset, val_set: Dataset, start_ep: int, start_it: int, device: torch.device
                  ) -> Tuple[GlobalBatchSampler, DataLoader, DataLoader]:
    rank, world = dist.get_rank(), dist.get_world_size()
    sampler = GlobalBatchSampler(len(train_set), args.glb_batch_size, world_size=world, rank=rank, seed=args.same_seed_for_all_ranks,
                                 shuffle=True, fill_last=True, start_ep=start_ep, start_it=start_it)
    pin = device.type == 'cuda'
    ld_train = DataLoader(train_set, batch_sampler=sampler, num_workers=args.workers, pin_memory=pin, persistent_workers=args.workers > 0)
    ld_val = DataLoader(val_set, batch_size=max(1, round(args.batch_size * 1.5)), sampler=EvalShardSampler(len(val_set), world, rank),
                        num_workers=args.workers, pin_memory=pin, drop_last=False)
    return sampler, ld_train, ld_val


def append_log(path: str, record: Dict) -> None:
    """One JSON line in log.txt (rank 0 only)."""
    if dist.is_master():
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite gradient; too many in a row stop the run."""

    def __init__(self, patience: int, last_ckpt: str):
        self.patience, self.last_ckpt = patience, last_ckpt
        self.run, self.total = 0, 0

    def step(self, skipped: bool, g_it: int, grad_norm) -> None:
        if not skipped:
            self.run = 0
            return
        self.run += 1
        self.total += 1
        logger.warning('iteration %d: non-finite gradient (norm %s), optimizer step skipped (%d in a row)', g_it, grad_norm, self.run)
        if self.run >= self.patience:
            raise TrainingStopped(
                f'training stopped: {self.run} optimizer steps in a row had a non-finite loss or gradient (iteration {g_it}). '
                f'No checkpoint was written for them; the last good one is {self.last_ckpt}. '
                f'Try a lower learning rate, a stronger gradient clip, or --fp16=2 (bfloat16)')


class CheckpointWriter:
    """Writes <last> (keeping the one before as <prev>) and <best>, atomically, never from non-finite weights.

    `state_fn(epoch, iter)` builds the checkpoint dict; only the local master writes.
    """

    def __init__(self, out_dir: str, last: str, prev: str, best: str, state_fn: Callable[[int, int], Dict],
                 modules: Dict[str, torch.nn.Module], iters_per_ep: int, every_min: float, every_it: int):
        self.last, self.prev, self.best = (osp.join(out_dir, n) for n in (last, prev, best))
        self.state_fn, self.modules = state_fn, modules
        self.iters_per_ep = iters_per_ep
        self.every_min, self.every_it = every_min, every_it
        self.last_time = time.time()
        self.pending = False

    def due(self, g_it: int) -> bool:
        """After optimizer step g_it: is a periodic (or postponed) checkpoint due?"""
        by_time = self.every_min > 0 and time.time() - self.last_time >= self.every_min * 60
        by_it = self.every_it > 0 and (g_it + 1) % self.every_it == 0
        return by_time or by_it or self.pending

    def _check_finite(self) -> None:
        bad = [f'{name}.{n}' for name, m in self.modules.items() for n, p in m.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingStopped(f'training stopped: {len(bad)} weight tensors are no longer finite ({", ".join(bad[:5])}); '
                                  f'no checkpoint was written, the last good one is {self.last}. '
                                  f'Try a lower learning rate, a stronger gradient clip, or --fp16=2 (bfloat16)')

    def save(self, ep_next: int, it_next: int, best: bool = False) -> None:
        """Checkpoint the state before iteration it_next of epoch ep_next."""
        if it_next >= self.iters_per_ep:
            ep_next, it_next = ep_next + 1, 0
        self._check_finite()
        if dist.is_local_master():
            save_atomic(self.state_fn(ep_next, it_next), self.last, prev_path=self.prev)
            if best:
                copy_atomic(self.last, self.best)
        self.last_time = time.time()
        self.pending = False

    def save_best_only(self, ep_next: int, it_next: int) -> None:
        self._check_finite()
        if dist.is_local_master():
            save_atomic(self.state_fn(ep_next, it_next), self.best)
