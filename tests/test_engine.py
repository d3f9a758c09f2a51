"""utils/engine.py with a task of its own (what a fork writes for its own model): accumulation, checkpoints, best, log.txt, resume."""
import json
from types import SimpleNamespace

import torch

from utils.engine import CheckpointNames, TrainingTask, run_training

NAMES = CheckpointNames('last.pth', 'prev.pth', 'best.pth')
ITERS = 4   # iterations per epoch


class Args(SimpleNamespace):
    def state_dict(self):
        return dict(vars(self))


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def make_args(**kw):
    base = dict(ep=3, wp=0, tb_name='tb', nonfinite_patience=3, ckpt_every_min=0, ckpt_every_it=0, seed=1, ac=2, glb_batch_size=8,
                val_every_ep=1, same_seed_for_all_ranks=0)
    return Args(**{**base, **kw})


class LineFit(TrainingTask):
    """Fits y = 2x with one weight; validation "improves" only at the epochs listed in `better_at`."""
    pbar_desc = 'test'

    def __init__(self, better_at=(1, 3)):
        self.w = torch.nn.Linear(1, 1, bias=False)
        self.opt = torch.optim.SGD(self.w.parameters(), lr=0.05)
        self.best = {'score': 0}
        self.better_at, self.stepped_at, self.seen = better_at, [], []

    def describe(self, iters_train):
        return f'line fit: {iters_train} iterations per epoch'

    def modules(self):
        return {'w': self.w}

    def model_config(self):
        return {'in': 1}

    def state_dict(self):
        return {'w': self.w.state_dict(), 'opt': self.opt.state_dict()}

    def train_step(self, g_it, stepping, batch, plan):
        self.seen.append(g_it)
        x_B1 = batch
        loss = ((self.w(x_B1) - 2 * x_B1) ** 2).mean()
        loss.backward()
        if stepping:
            self.opt.step()
            self.opt.zero_grad()
            self.stepped_at.append(g_it)
        return {'loss': loss.detach(), 'skipped': False, 'grad_norm': 0.0}

    def log_iter(self, g_it, out, tb, imgs_per_sec, skipped_steps):
        return {'loss': float(out['loss'])}, {'loss': f'{float(out["loss"]):.3f}'}

    def evaluate(self, ep_done):
        improved = ep_done in self.better_at
        if improved:
            self.best['score'] = ep_done
        return {'score': float(ep_done)}, improved


def batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 1, generator=g) for _ in range(n)]


def test_loop_steps_every_ac_iterations_and_writes_epoch_and_best_checkpoints(tmp_path):
    task = LineFit()
    metrics = run_training(make_args(), task, str(tmp_path), NAMES, [], batches(3 * ITERS), ITERS, 0, 0)
    assert task.seen == list(range(12)) and task.stepped_at == [1, 3, 5, 7, 9, 11]
    assert metrics['score'] == 3.0 and metrics['loss'] < 1.0
    last, best = load((tmp_path / 'last.pth')), load((tmp_path / 'best.pth'))
    assert (last['epoch'], last['iter'], best['epoch'], best['best']) == (3, 0, 3, {'score': 3})
    assert load((tmp_path / 'prev.pth'))['epoch'] == 2 and last['model_config'] == {'in': 1}
    assert torch.equal(last['trainer']['w']['weight'], task.w.weight.detach())
    lines = [json.loads(s) for s in (tmp_path / 'log.txt').read_text().splitlines()]
    assert [(d['ep'], d.get('eval', False)) for d in lines] == [(1, True), (1, False), (2, True), (2, False), (3, True), (3, False)]
    assert lines[-1]['it'] == 12 and lines[-1]['skipped_steps'] == 0


def test_loop_resumes_mid_epoch_and_an_odd_epoch_end_waits_for_the_optimizer_step(tmp_path):
    """ac=3 with 4 iterations per epoch: epoch 1 ends inside an accumulation, so only at iteration 5's step is <last> written."""
    task = LineFit(better_at=())
    run_training(make_args(ep=2, ac=3), task, str(tmp_path), NAMES, [], batches(2 * ITERS - 2), ITERS, 0, 2)
    assert task.seen == [2, 3, 4, 5, 6, 7] and task.stepped_at == [2, 5]
    last = load((tmp_path / 'last.pth'))
    assert (last['epoch'], last['iter']) == (1, 2)   # written at the first step after epoch 1 ended: (1 * 4 + 2)
    assert not (tmp_path / 'best.pth').exists()
    assert run_training(make_args(ep=2), LineFit(), str(tmp_path / 'done'), NAMES, [], [], ITERS, 2, 0) == {}
