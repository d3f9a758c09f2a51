"""The training loop that train.py (VAR) and train_vae.py (tokenizer) share, written once.

The loop owns what every training run does: the epoch/iteration bookkeeping, the per-iteration seed,
gradient accumulation (which micro step is an optimizer step), the non-finite guard, the progress bar,
tensorboard and log.txt, and the checkpoint cadence (minutes, iterations, the end of every epoch, the
best one). A `TrainingTask` (trainer.py `VARTask`, vae_trainer.py `VQVAETask`) answers for what is its
own: one training step, the metrics it logs, evaluation and its "best" criterion, its checkpoint state,
and its extra end-of-epoch and end-of-run work.
"""
import logging
import os.path as osp
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import dist
from utils.parallel import checkpoint_store
from utils.run import CheckpointWriter, IterationPlan, NonFiniteGuard, append_log, iteration_seed, plan_iterations
from utils.tb import TensorboardLogger

__all__ = ['TrainingTask', 'CheckpointNames', 'run_training']

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointNames:
    """File names of a run's checkpoints in its output folder: the latest, the one before it, the best."""
    last: str
    prev: str
    best: str


class TrainingTask:
    """What a trainer tells the loop. Every hook but train_step and evaluate has a do-nothing default."""
    pbar_desc = 'train'
    rng_rule = 'torch.manual_seed(iteration_seed(seed, rank, g_it)) before each iteration'
    best: Dict[str, float]   # the best validation values so far (set by the task), stored in the checkpoints
    class_names: Optional[List[str]] = None   # the training data's class names (id = position; set by the script), in every checkpoint

    def describe(self, iters_train: int) -> str:
        """The log line that starts the training."""
        raise NotImplementedError

    def modules(self) -> Dict[str, torch.nn.Module]:
        """The trained modules, whose weights must be finite before any checkpoint is written."""
        raise NotImplementedError

    def model_config(self) -> Dict:
        raise NotImplementedError

    def state_dict(self) -> Dict:
        raise NotImplementedError

    def train_step(self, g_it: int, stepping: bool, batch, plan: IterationPlan) -> Dict[str, object]:
        """One micro step (learning-rate schedule included) on a batch of the loader; the loss, and on optimizer steps
        (stepping) 'skipped' and 'grad_norm'."""
        raise NotImplementedError

    def log_iter(self, g_it: int, out: Dict[str, object], tb: TensorboardLogger, imgs_per_sec: float,
                 skipped_steps: int) -> Tuple[Dict[str, float], Dict[str, str]]:
        """Write the iteration's metrics to tensorboard; (the ones averaged over the epoch, the progress-bar fields)."""
        raise NotImplementedError

    def epoch_fields(self, skipped_steps: int, skipped_images: int) -> Dict:
        """The fields of the epoch's log.txt line after the averaged metrics."""
        return {'skipped_steps': skipped_steps, 'skipped_images': skipped_images}

    def evaluate(self, ep_done: int) -> Tuple[Dict[str, float], bool]:
        """Validation after epoch ep_done: (its metrics, whether they improve the best by this task's criterion)."""
        raise NotImplementedError

    def report_eval(self, ep_done: int, metrics: Dict[str, float], tb: TensorboardLogger) -> Dict:
        """Log the validation; the fields of its log.txt line."""
        return {k: round(v, 5) for k, v in metrics.items()}

    def report_epoch(self, ep_done: int, stats: Dict[str, float], sec: float, remain: float) -> None:
        """The log line of a finished epoch (stats: the epoch's averaged metrics)."""

    def end_epoch(self, ep_done: int, stats: Dict[str, float], remain: float, tb: TensorboardLogger) -> None:
        """Extra end-of-epoch work, before the epoch's checkpoint."""

    def after_epoch_checkpoint(self, stepped: bool) -> None:
        """Extra work after the epoch's checkpoint (stepped: the epoch ended on an optimizer step)."""

    def finish(self) -> None:
        """After the last epoch, before the run is checked for non-finite losses."""

    def publish(self, metrics: Dict[str, float]) -> None:
        """After a finished, finite run (rank 0 only)."""


class _Epoch:
    """Running sums of one epoch: its averaged metrics and its throughput."""

    def __init__(self, t_log: float, it_log: int):
        self.t0 = time.time()
        self.sums: Dict[str, float] = {}
        self.n_logged = 0
        self.t_log, self.it_log = t_log, it_log

    def add(self, scalars: Dict[str, float]) -> None:
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n_logged += 1

    def means(self) -> Dict[str, float]:
        return {k: v / max(self.n_logged, 1) for k, v in self.sums.items()}


class _Loop:
    """One run of the loop: its guard, checkpoint writer, progress bar and data stream."""

    def __init__(self, args, task: TrainingTask, out_dir: str, names: CheckpointNames, train_set, ld_train: DataLoader,
                 iters_train: int, plan: IterationPlan, tb: TensorboardLogger):
        self.args, self.task, self.train_set = args, task, train_set
        self.iters_train, self.plan, self.tb = iters_train, plan, tb
        self.rank = dist.get_rank()
        self.log_txt = osp.join(out_dir, 'log.txt')
        self.guard = NonFiniteGuard(args.nonfinite_patience, checkpoint_store(args).path(osp.join(out_dir, names.last)))
        self.writer = CheckpointWriter(out_dir, names.last, names.prev, names.best, self.checkpoint_state, task.modules(), iters_train,
                                       args.ckpt_every_min, args.ckpt_every_it, guard=self.guard, store=checkpoint_store(args))
        self.pbar = tqdm(total=plan.max_it, initial=plan.start_g_it, disable=not dist.is_master(), dynamic_ncols=True,
                         desc=task.pbar_desc, unit='it')
        self.ld_iter = iter(ld_train)
        self.last_val: Dict[str, float] = {}

    def checkpoint_state(self, ep_next: int, it_next: int) -> Dict:
        args = self.args
        return {'epoch': ep_next, 'iter': it_next, 'trainer': self.task.state_dict(), 'args': args.state_dict(),
                'best': dict(self.task.best), 'model_config': self.task.model_config(),   # models/config.py
                'class_names': self.task.class_names,   # utils/class_names.py: what each label means
                # where the data stream stands, and how every random draw after it is seeded
                'sampler': {'epoch': ep_next, 'iter': it_next, 'glb_batch_size': args.glb_batch_size, 'seed': args.same_seed_for_all_ranks},
                'rng': {'seed': args.seed, 'rule': self.task.rng_rule}}

    def run(self, start_ep: int, start_it: int) -> Dict[str, float]:
        t_log, it_log = time.time(), self.plan.start_g_it
        stats = {}
        for ep in range(start_ep, self.args.ep):
            epoch = _Epoch(t_log, it_log)
            for it in range(start_it if ep == start_ep else 0, self.iters_train):
                self.iteration(ep, it, epoch)
            t_log, it_log = epoch.t_log, epoch.it_log
            stats = self.end_epoch(ep, epoch)
        self.pbar.close()
        self.tb.close()
        self.task.finish()
        self.guard.finish()
        metrics = {**stats, **self.last_val}
        if dist.is_master():
            self.task.publish(metrics)
        dist.barrier()   # the other processes wait for rank 0's export before they tear the process group down
        return metrics

    def iteration(self, ep: int, it: int, epoch: _Epoch) -> None:
        """One micro step: seed, train step, non-finite guard, progress, logging, periodic checkpoint."""
        g_it = ep * self.iters_train + it
        batch = next(self.ld_iter)
        torch.manual_seed(iteration_seed(self.args.seed, self.rank, g_it))
        stepping = (g_it + 1) % self.args.ac == 0
        out = self.task.train_step(g_it, stepping, batch, self.plan)
        self.guard.step(g_it, stepping, out)
        self.pbar.update(1)
        if (g_it + 1) % self.plan.log_every == 0 or it == self.iters_train - 1 or g_it == self.plan.start_g_it:
            now = time.time()
            imgs_per_sec = (g_it + 1 - epoch.it_log) * self.args.glb_batch_size / max(now - epoch.t_log, 1e-9)
            epoch.t_log, epoch.it_log = now, g_it + 1
            scalars, postfix = self.task.log_iter(g_it, out, self.tb, imgs_per_sec, self.guard.total)
            epoch.add(scalars)
            if dist.is_master():
                self.pbar.set_postfix(ep=f'{ep + 1}/{self.args.ep}', **postfix, img_s=f'{imgs_per_sec:.1f}', refresh=False)
        if stepping and self.writer.due(g_it):
            self.writer.save(ep, it + 1)

    def end_epoch(self, ep: int, epoch: _Epoch) -> Dict[str, float]:
        """Validation, logs and the task's extra work; whatever fails in them, the epoch's checkpoint is written."""
        args, ep_done = self.args, ep + 1
        best_improved = False
        try:
            stats = epoch.means()
            n_skipped_imgs = int(self.train_set.n_skipped.item()) if hasattr(self.train_set, 'n_skipped') else 0
            sec = time.time() - epoch.t0
            remain = sec * (args.ep - ep_done)
            record = {'ep': ep_done, 'it': ep_done * self.iters_train, **{k: round(v, 5) for k, v in stats.items()},
                      **self.task.epoch_fields(self.guard.total, n_skipped_imgs), 'sec_per_ep': round(sec, 2),
                      'remain_hours': round(remain / 3600, 3)}
            if n_skipped_imgs:
                logger.warning('%d unreadable images were skipped so far', n_skipped_imgs)
            if ep_done % args.val_every_ep == 0 or ep_done == args.ep:
                self.last_val, best_improved = self.task.evaluate(ep_done)
                self.guard.check_values(f'epoch {ep_done} validation', self.last_val)
                append_log(self.log_txt, {'ep': ep_done, 'eval': True, **self.task.report_eval(ep_done, self.last_val, self.tb)})
            self.task.report_epoch(ep_done, stats, sec, remain)
            append_log(self.log_txt, record)
            self.task.end_epoch(ep_done, stats, remain, self.tb)
            self.tb.flush()
        finally:
            stepped = (ep_done * self.iters_train) % args.ac == 0
            self.writer.end_epoch(ep_done, stepped, best_improved)
            self.task.after_epoch_checkpoint(stepped)
        return stats


def run_training(args, task: TrainingTask, out_dir: str, names: CheckpointNames, train_set, ld_train: DataLoader, iters_train: int,
                 start_ep: int, start_it: int) -> Dict[str, float]:
    """Train `task` from (start_ep, start_it) to args.ep epochs; the last epoch's averaged and validation metrics ({} when the
    run had already finished)."""
    tb = TensorboardLogger(osp.join(out_dir, args.tb_name), enabled=dist.is_master())
    plan = plan_iterations(args.ep, args.wp, iters_train, start_ep, start_it)
    if plan is None:
        return {}
    logger.info('%s', task.describe(iters_train))
    return _Loop(args, task, out_dir, names, train_set, ld_train, iters_train, plan, tb).run(start_ep, start_it)
