"""What every training script shares: set-up, resume, data loaders, checkpoint writing, seeds, logs."""
import json
import logging
import math
import os
import os.path as osp
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

import dist
from utils.ckpt import ConfigMismatchError, FileStore, remove_stale_temps, set_aside
from utils.cli import TrainingStopped
from utils.data_sampler import EvalShardSampler, GlobalBatchSampler
from utils.log import setup_logging
from utils.parallel import checkpoint_store, nonfinite_names

__all__ = ['iteration_seed', 'IterationPlan', 'plan_iterations', 'setup_run', 'resume', 'check_resume_config', 'build_loaders', 'CheckpointWriter', 'append_log',
           'strict_json', 'NonFiniteGuard', 'TEST_KILL_ENV']

# Test-only: a process that finds this variable set to N sends itself SIGKILL right after it has written a
# checkpoint of the state at global iteration >= N (epoch * iterations per epoch + iteration), so that the
# resume tests kill a run at a known point instead of racing a timer (sample.py: after N images of this
# process). Never set it outside the tests.
TEST_KILL_ENV = 'VAR_TEST_SIGKILL_AT_ITER'

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
    if dist.is_local_master():
        removed, kept = remove_stale_temps(out_dir)
        if removed:
            logger.info('removed %d temporary checkpoint files left by an interrupted run: %s', len(removed), ', '.join(removed))
        if kept:
            logger.warning('kept temporary files of processes still running on this machine (is another run writing to %s?): %s',
                           out_dir, ', '.join(kept))
    args.finalize(dist.get_world_size())
    if getattr(args, 'tf32', False) and device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    logger.info('command: %s %s', sys.argv[0], args.cmd)
    logger.info('%s', dist.describe())
    return device


def resume(args, out_dir: str, names: Sequence[str], validate: Callable[[Dict], None]) -> Tuple[Optional[Dict], int, int]:
    """(checkpoint or None, start epoch, start iteration); sets args.seed from the checkpoint or draws one.

    Damaged checkpoints in front of the one resumed from are renamed to <name>.damaged, so that the next
    checkpoint written does not turn a damaged file into the previous one.
    """
    store = checkpoint_store(args)
    _check_store_matches(store, out_dir, names)
    ckpt, ckpt_path, damaged = store.load_first_good([store.path(osp.join(out_dir, n)) for n in names], validate=validate)
    if damaged:
        dist.barrier()   # every process has read the files before one is renamed
        if dist.is_local_master():
            for path in damaged:
                dst = set_aside(path)
                if dst is not None:
                    logger.warning('moved the damaged %s to %s (it will not be read again; delete it when you no longer need it)', path, dst)
        dist.barrier()
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


def _check_store_matches(store, out_dir: str, names: Sequence[str]) -> None:
    """Stop when the output folder holds checkpoints of the other kind only (DDP's .pth files, --fsdp=1's .dcp folders),
    instead of silently starting over beside them; remove the temporary folders of a killed --fsdp=1 run."""
    from utils.dcp_ckpt import SUFFIX, ShardedStore
    if store.suffix == SUFFIX and dist.is_master():
        removed = ShardedStore.remove_stale(out_dir)
        if removed:
            logger.info('removed %d temporary checkpoint folders left by an interrupted run: %s', len(removed), ', '.join(removed))
    dist.barrier()
    mine = [n for n in names if osp.exists(store.path(osp.join(out_dir, n)))]
    other = SUFFIX if store.suffix != SUFFIX else '.pth'
    theirs = [n[:-len('.pth')] + other for n in names if osp.exists(osp.join(out_dir, n[:-len('.pth')] + other))]
    if theirs and not mine:
        if other == SUFFIX:
            raise ConfigMismatchError(f'{out_dir} holds the sharded checkpoints of a --fsdp=1 run ({", ".join(theirs)}): resume with '
                                      '--fsdp=1 (on any number of processes), or convert one with tools/consolidate_ckpt.py')
        raise ConfigMismatchError(f'{out_dir} holds the checkpoints of a run without --fsdp ({", ".join(theirs)}): resume with --fsdp=0, '
                                  'or use another --local_out_dir_path for the --fsdp=1 run')


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


def strict_json(value):
    """The value with every non-finite float written as the string "NaN", "Infinity" or "-Infinity" (float() reads them back)."""
    if isinstance(value, float) and not math.isfinite(value):
        return 'NaN' if math.isnan(value) else ('Infinity' if value > 0 else '-Infinity')
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def append_log(path: str, record: Dict) -> None:
    """One strict JSON line in log.txt (rank 0 only): a non-finite value is a string, never a bare NaN."""
    if dist.is_master():
        with open(path, 'a') as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + '\n')


def _last_checkpoint_note(path: str) -> str:
    if osp.exists(path):
        return f'The last checkpoint, {path}, holds finite weights from before these steps (a skipped step changes no weight). '
    return f'No checkpoint has been written yet ({path} does not exist). '


class NonFiniteGuard:
    """Watches the loss of every iteration and every optimizer step.

    A step skipped for a non-finite gradient is counted; `patience` of them in a row stop the run at once.
    A non-finite loss (training or validation) lets the run go on, but `finish()` then ends it with an error.
    """

    def __init__(self, patience: int, last_ckpt: str):
        self.patience, self.last_ckpt = patience, last_ckpt
        self.run, self.total = 0, 0
        self.n_bad_loss, self.first_bad_loss_it = 0, None
        self.bad_values = []
        self._bad_loss_t = None   # on the device, read on optimizer steps only (no extra synchronisation)

    def step(self, g_it: int, stepping: bool, out: Dict) -> None:
        """After the micro step g_it; out: the trainer's 'loss' (and 'd_loss'), and on stepping ones 'skipped', 'grad_norm'."""
        for k in ('loss', 'd_loss'):
            if k in out:
                bad = (~torch.isfinite(torch.as_tensor(out[k]).detach())).sum()
                self._bad_loss_t = bad if self._bad_loss_t is None else self._bad_loss_t + bad
        if not stepping:
            return
        n_bad = int(self._bad_loss_t) if self._bad_loss_t is not None else 0
        if n_bad > self.n_bad_loss:
            if self.first_bad_loss_it is None:
                self.first_bad_loss_it = g_it
            self.n_bad_loss = n_bad
            logger.warning('iteration %d: non-finite loss', g_it)
        if not out['skipped']:
            self.run = 0
            return
        self.run += 1
        self.total += 1
        logger.warning('iteration %d: non-finite gradient (norm %s), optimizer step skipped (%d in a row)', g_it, out['grad_norm'], self.run)
        if self.run >= self.patience:
            raise TrainingStopped(
                f'training stopped: {self.run} optimizer steps in a row had a non-finite loss or gradient (the last at iteration {g_it}). '
                + _last_checkpoint_note(self.last_ckpt) + 'Try a lower learning rate, a stronger gradient clip, or --fp16=2 (bfloat16)')

    def check_values(self, where: str, values: Dict) -> None:
        """Note non-finite reported values (e.g. the validation losses of an epoch)."""
        bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            logger.warning('%s: non-finite %s', where, ', '.join(f'{k}={v}' for k, v in bad.items()))
            self.bad_values.append(f'{where}: ' + ', '.join(f'{k}={v}' for k, v in bad.items()))

    def finish(self) -> None:
        """End a finished run with an error, on every process, when it produced non-finite losses."""
        problems = []
        n_bad_t = torch.tensor([float(self.n_bad_loss)])
        dist.allreduce(n_bad_t)   # a loss that was not finite on one process only
        n_bad = int(n_bad_t.item())
        if n_bad:
            first = f'the first by iteration {self.first_bad_loss_it}; ' if self.first_bad_loss_it is not None else ''
            problems.append(f'{n_bad} training losses were not finite ({first}{self.total} optimizer steps were skipped)')
        problems += self.bad_values[:5]
        if problems:
            raise TrainingStopped('training finished, but its results are not trustworthy: ' + '; '.join(problems)
                                  + '. log.txt writes these values as "NaN"/"Infinity". Try a lower learning rate, '
                                    'a stronger gradient clip, or --fp16=2 (bfloat16)')


class CheckpointWriter:
    """Writes <last> (keeping the one before as <prev>) and <best>, atomically, with a payload checksum, never from
    non-finite weights, and no periodic one in the middle of a run of skipped steps.

    `state_fn(epoch, iter)` builds the checkpoint dict; only the local master writes.
    """

    def __init__(self, out_dir: str, last: str, prev: str, best: str, state_fn: Callable[[int, int], Dict],
                 modules: Dict[str, torch.nn.Module], iters_per_ep: int, every_min: float, every_it: int,
                 guard: Optional[NonFiniteGuard] = None, store=None):
        self.store = store if store is not None else FileStore()   # utils/parallel.py checkpoint_store
        self.last, self.prev, self.best = (self.store.path(osp.join(out_dir, n)) for n in (last, prev, best))
        self.state_fn, self.modules = state_fn, modules
        self.iters_per_ep = iters_per_ep
        self.every_min, self.every_it = every_min, every_it
        self.guard = guard
        self.last_time = time.time()
        self.pending = False
        kill_at = os.environ.get(TEST_KILL_ENV, '')
        self.test_kill_at = int(kill_at) if kill_at.strip() else None

    def due(self, g_it: int) -> bool:
        """After optimizer step g_it: is a periodic (or postponed) checkpoint due? Not while steps are being skipped."""
        by_time = self.every_min > 0 and time.time() - self.last_time >= self.every_min * 60
        if self.every_min > 0 and self.store.collective:   # every process writes (--fsdp=1): rank 0's clock decides for all
            by_time = bool(dist.broadcast(torch.tensor([int(by_time)]), src=0).item())
        by_it = self.every_it > 0 and (g_it + 1) % self.every_it == 0
        if (by_time or by_it) and self.guard is not None and self.guard.run > 0:
            self.pending = True   # written at the next good step
            return False
        return by_time or by_it or self.pending

    def _check_finite(self) -> None:
        bad = nonfinite_names(self.modules)   # every process's shard under --fsdp=1
        if bad:
            raise TrainingStopped(f'training stopped: {len(bad)} weight tensors are no longer finite ({", ".join(bad[:5])}); '
                                  f'no checkpoint was written for them. ' + _last_checkpoint_note(self.last)
                                  + 'Try a lower learning rate, a stronger gradient clip, or --fp16=2 (bfloat16)')

    def save(self, ep_next: int, it_next: int, best: bool = False) -> None:
        """Checkpoint the state before iteration it_next of epoch ep_next."""
        if it_next >= self.iters_per_ep:
            ep_next, it_next = ep_next + 1, 0
        self._check_finite()
        self.store.save(lambda: self.state_fn(ep_next, it_next), self.last, prev_path=self.prev, best_path=self.best if best else None)
        self.last_time = time.time()
        self.pending = False
        self._test_kill(ep_next * self.iters_per_ep + it_next)

    def save_best_only(self, ep_next: int, it_next: int) -> None:
        self._check_finite()
        self.store.save(lambda: self.state_fn(ep_next, it_next), self.best)

    def end_epoch(self, ep_next: int, stepped: bool, best: bool) -> None:
        """The checkpoint at the end of an epoch; when the epoch ended inside a gradient accumulation (stepped False),
        <last> waits for the next optimizer step and only <best> is written now."""
        if stepped:
            self.save(ep_next, 0, best=best)
        else:
            self.pending = True
            if best:
                self.save_best_only(ep_next, 0)

    def _test_kill(self, g_it_next: int) -> None:
        if self.test_kill_at is not None and g_it_next >= self.test_kill_at:
            logger.warning('%s=%d: killing this process after the checkpoint at global iteration %d', TEST_KILL_ENV, self.test_kill_at, g_it_next)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)
