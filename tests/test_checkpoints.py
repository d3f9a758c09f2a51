"""Checkpoint safety of the training scripts: payload checksums and the fallback to the previous checkpoint,
temporary files of a killed run, non-finite losses, strict log.txt, periodic checkpoints, tensorboard values."""
import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, reference_file, run_and_kill_after_checkpoint, run_script, script_env
from test_train import read_scalars, train_flags


def strict_lines(path: Path):
    """log.txt parsed as strict JSON: a bare NaN or Infinity is an error."""
    def no_constant(name):
        raise ValueError(f'bare {name} in {path}')
    return [json.loads(line, parse_constant=no_constant) for line in path.read_text().splitlines()]


def flip_a_bit_in_the_largest_tensor(path: Path) -> None:
    """Flip one bit in the middle of the largest data record of a torch zip file (torch.load does not notice)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
        pos = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x10]))


def load(path: Path):
    return torch.load(path, map_location='cpu', weights_only=True)


# ---------------------------------------------------------------------- checksums (in process)
def test_a_flipped_bit_is_detected_and_the_previous_checkpoint_is_used(tmp_path, caplog):
    from utils.ckpt import CHECKSUM_KEY, load_first_good, save_atomic, with_checksum
    last, prev = tmp_path / 'last.pth', tmp_path / 'prev.pth'
    g = torch.Generator().manual_seed(0)
    for ep in (1, 2):
        state = {'epoch': ep, 'iter': 0, 'trainer': {'w': torch.randn(4096, generator=g), 'b': torch.zeros(3, dtype=torch.bfloat16)},
                 'args': {'pn': (1, 2), 'lr': 1e-3, 'name': 'x', 'none': None}}
        save_atomic(with_checksum(state), str(last), prev_path=str(prev))
    assert CHECKSUM_KEY in load(last)
    ckpt, path, damaged = load_first_good([str(last), str(prev)])
    assert path == str(last) and ckpt['epoch'] == 2 and not damaged and CHECKSUM_KEY not in ckpt

    flip_a_bit_in_the_largest_tensor(last)
    assert load(last)['epoch'] == 2, 'torch.load itself does not notice a flipped bit'
    with caplog.at_level(logging.WARNING):
        ckpt, path, damaged = load_first_good([str(last), str(prev)])
    assert path == str(prev) and ckpt['epoch'] == 1 and damaged == [str(last)]
    assert 'do not match the checksum' in caplog.text


def test_both_checkpoints_damaged_is_a_clear_error(tmp_path):
    from utils.ckpt import CheckpointDamagedError, load_first_good, save_atomic, with_checksum
    last, prev = tmp_path / 'last.pth', tmp_path / 'prev.pth'
    for ep in (1, 2):
        save_atomic(with_checksum({'epoch': ep, 'w': torch.randn(1000)}), str(last), prev_path=str(prev))
    flip_a_bit_in_the_largest_tensor(last)
    prev.write_bytes(prev.read_bytes()[:100])   # truncated
    with pytest.raises(CheckpointDamagedError) as e:
        load_first_good([str(last), str(prev)])
    msg = str(e.value)
    assert '2 damaged' in msg and f'{last} (CheckpointDamagedError' in msg and f'{prev} (' in msg and 'Move these files away' in msg


def test_a_checkpoint_without_checksum_loads_with_one_note(tmp_path, caplog):
    from utils.ckpt import load_first_good
    ref = reference_file('ckpt_reference_tiny.pth')   # written by the reference's trainer: no checksum
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            ckpt, path, damaged = load_first_good([str(ref)])
            assert path == str(ref) and not damaged and (ckpt['epoch'], ckpt['iter']) == (1, 0)
    assert caplog.text.count('has no payload checksum') == 1


def test_the_guard_does_not_call_a_missing_checkpoint_the_last_good_one(tmp_path):
    from utils.cli import TrainingStopped
    from utils.run import NonFiniteGuard
    guard = NonFiniteGuard(2, str(tmp_path / 'ar-ckpt-last.pth'))
    nan = torch.tensor(float('nan'))
    guard.step(0, True, {'loss': nan, 'skipped': True, 'grad_norm': math.nan})
    with pytest.raises(TrainingStopped) as e:
        guard.step(1, True, {'loss': nan, 'skipped': True, 'grad_norm': math.nan})
    assert 'No checkpoint has been written yet' in str(e.value) and 'last good' not in str(e.value)


# ---------------------------------------------------------------------- train.py and train_vae.py end to end
def test_a_bit_flip_in_the_newest_checkpoint_never_replaces_the_previous(shapes_data, tiny_vae_ckpt, tmp_path):
    out = tmp_path / 'run'
    flags = ['--bs=8', '--ep=1', '--seed=1', '--ckpt_every_it=5']   # 12 iterations: checkpoints at 5, 10 (prev) and the end (last)
    run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags))
    prev_bytes = (out / 'ar-ckpt-prev.pth').read_bytes()
    flip_a_bit_in_the_largest_tensor(out / 'ar-ckpt-last.pth')
    stale, kept = leave_temporary_files(out, tmp_path)
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags))
    assert 'ar-ckpt-last.pth is damaged' in res.stdout and 'do not match the checksum' in res.stdout
    assert 'ar-ckpt-prev.pth at epoch 0, iteration 10' in res.stdout
    assert (out / 'ar-ckpt-last.pth.damaged').is_file(), 'the damaged file is set aside'
    # the second half retrained: the new last is good and the previous one is still the good file, not the damaged one
    assert (out / 'ar-ckpt-prev.pth').read_bytes() == prev_bytes
    from utils.ckpt import load_first_good
    for name, pos in (('ar-ckpt-last.pth', (1, 0)), ('ar-ckpt-prev.pth', (0, 10))):
        ck, _, damaged = load_first_good([str(out / name)])
        assert (ck['epoch'], ck['iter']) == pos and not damaged
    # temporary files of a killed run are gone, only this project's names in its own output folder
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert 'removed 2 temporary checkpoint files left by an interrupted run' in res.stdout
    assert 'kept temporary files of processes still running on this machine' in res.stdout


def leave_temporary_files(out: Path, tmp_path: Path):
    """(temporary checkpoint files a killed run leaves, files that must stay) in and beside the output folder `out`."""
    # a process killed while it writes a checkpoint, its temporary file named by save_atomic
    killed = subprocess.run([sys.executable, '-c', 'import os, sys; from models.weights import temporary_name; '
                             'open(temporary_name(sys.argv[1]), "wb").write(b"x" * 100000); os.kill(os.getpid(), 9)',
                             str(out / 'ar-ckpt-last.pth')], cwd=REPO, env=script_env())
    assert killed.returncode == -9
    stale = [p for p in out.iterdir() if '.pth.tmp-' in p.name] + [out / 'ar-ckpt-prev.pth.tmp-another-node-4242']
    assert len(stale) == 2
    running = out / f'ar-ckpt-best.pth.tmp-{socket.gethostname()}-{os.getpid()}'   # this test process is alive
    kept = [running, out / 'notes.tmp', out / 'ar-ckpt-last.pth.tmp', out / 'data.bin.tmp-host-12', tmp_path / 'ar-ckpt-last.pth.tmp-host-12']
    for p in stale[1:] + kept:
        p.write_bytes(b'y' * 1000)
    return stale, kept


def test_train_vae_falls_back_to_the_previous_checkpoint_and_refuses_other_models(tiny_shapes, tmp_path):
    from test_train_vae import vae_flags
    out = tmp_path / 'vae'
    flags = ['--bs=4', '--ep=1', '--lpips_weight=0', '--disc_start=-1', '--seed=0', '--ckpt_every_it=4']   # 6 iterations: prev at 4
    run_script(vae_flags(tiny_shapes, out, *flags))
    prev_bytes = (out / 'vae-ckpt-prev.pth').read_bytes()
    flip_a_bit_in_the_largest_tensor(out / 'vae-ckpt-last.pth')
    res = run_script(vae_flags(tiny_shapes, out, *flags))
    assert 'vae-ckpt-last.pth is damaged' in res.stdout and 'vae-ckpt-prev.pth at epoch 0, iteration 4' in res.stdout
    assert (out / 'vae-ckpt-prev.pth').read_bytes() == prev_bytes and load(out / 'vae-ckpt-last.pth')['epoch'] == 1

    # resuming with flags of another tokenizer
    res = run_script(vae_flags(tiny_shapes, out, '--bs=4', '--ep=2', '--lpips_weight=0', '--disc_start=-1').__add__(['--vocab_size=128']),
                     check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert 'another model configuration: --vocab_size: checkpoint 64, now 128' in res.stderr

    # a tokenizer of another shape as --vae_ckpt
    res = run_script(vae_flags(tiny_shapes, tmp_path / 'ft', '--bs=4', '--ep=1', '--lpips_weight=0', f'--vae_ckpt={out / "vae.pth"}')
                     .__add__(['--vocab_size=128']), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert f'{out / "vae.pth"} does not fit the tokenizer that the flags build (--vocab_size=128' in res.stderr
    assert 'quantize.embedding.weight: checkpoint [64, 8], model [128, 8]' in res.stderr

    # both checkpoints damaged
    for name in ('vae-ckpt-last.pth', 'vae-ckpt-prev.pth'):
        flip_a_bit_in_the_largest_tensor(out / name)
    res = run_script(vae_flags(tiny_shapes, out, *flags), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert 'no readable checkpoint to resume from: 2 damaged' in res.stderr and 'Move these files away' in res.stderr


def test_non_finite_losses_end_the_run_with_an_error_and_a_strict_log(tiny_shapes, tiny_vae_ckpt, tmp_path):
    """The loss becomes NaN after the first (huge) step; with a large patience the run goes on to the end."""
    out = tmp_path / 'run'
    res = run_script(train_flags(tiny_shapes, tiny_vae_ckpt, out, '--bs=8', '--ep=1', '--tblr=1e35', '--tclip=0', '--seed=0',
                                 '--nonfinite_patience=1000', '--twde=0.1'), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert 'training finished, but its results are not trustworthy: 2 training losses were not finite (the first by iteration 1; ' \
           '2 optimizer steps were skipped)' in res.stderr
    assert 'epoch 1 validation: vL_mean=nan' in res.stderr
    lines = strict_lines(out / 'log.txt')
    assert lines[0]['eval'] and lines[0]['vL_mean'] == 'NaN' and lines[1]['L_mean'] == 'NaN' and lines[1]['skipped_steps'] == 2

    # tensorboard holds the schedule's lr and wd and the running count of skipped steps
    from utils.lr_control import lr_wd_annealing
    args = load(out / 'ar-ckpt-last.pth')['args']
    iters = 3
    sc = read_scalars(out)
    assert [s for s, _ in sc['AR_opt/lr_max']] == list(range(iters)), 'logged at every iteration'
    opt = torch.optim.AdamW([{'params': [torch.zeros(2, 2, requires_grad=True)], 'wd_sc': 1.0, 'lr_sc': 1.0},
                             {'params': [torch.zeros(2, requires_grad=True)], 'wd_sc': 0.0, 'lr_sc': 1.0}])
    for (s, lr), (s2, wd), (s3, skipped) in zip(sc['AR_opt/lr_max'], sc['AR_opt/wd_max'], sc['AR_opt/skipped_steps']):
        assert s == s2 == s3
        _, lr_want, _, wd_want = lr_wd_annealing(args['sche'], opt, args['tlr'], args['twd'], args['twde'], s, args['wp'] * iters,
                                                 args['ep'] * iters, wp0=args['wp0'], wpe=args['wpe'])
        assert lr == pytest.approx(lr_want, rel=1e-6) and wd == pytest.approx(wd_want, rel=1e-6), s
        assert skipped == s, 'every step after the first is skipped'
    assert len({round(v, 6) for _, v in sc['AR_opt/wd_max']}) > 1, 'the weight decay moves from --twd to --twde'


def test_train_vae_non_finite_losses_end_the_run_with_an_error_and_a_strict_log(tiny_shapes, tmp_path):
    from test_train_vae import vae_flags
    out = tmp_path / 'vae'
    res = run_script(vae_flags(tiny_shapes, out, '--bs=4', '--ep=1', '--lr=1e35', '--clip=0', '--lpips_weight=0', '--disc_start=-1',
                               '--nonfinite_patience=1000', '--seed=0'), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert 'training finished, but its results are not trustworthy' in res.stderr and 'training losses were not finite' in res.stderr
    lines = strict_lines(out / 'log.txt')
    assert lines[-1]['rec_loss'] == 'NaN' and lines[-1]['skipped_steps'] > 0


def test_validation_failure_keeps_the_epochs_checkpoint(tiny_vae_ckpt, tiny_shapes, tmp_path):
    """An error in the end-of-epoch bookkeeping (here: validation, made to fail) still leaves the epoch's checkpoint."""
    from test_train_vae import vae_flags
    for script, patch, argv, name in (
            ('train.py', 'import trainer as m; m.VARTrainer.eval_ep = boom',
             train_flags(tiny_shapes, tiny_vae_ckpt, tmp_path / 'var', '--bs=8', '--ep=1', '--seed=0'), 'var/ar-ckpt-last.pth'),
            ('train_vae.py', 'import vae_trainer as m; m.VQVAETrainer.evaluate = boom',
             vae_flags(tiny_shapes, tmp_path / 'vae', '--bs=4', '--ep=1', '--lpips_weight=0', '--disc_start=-1'), 'vae/vae-ckpt-last.pth')):
        code = ('import runpy, sys\n'
                'def boom(*a, **k):\n    raise RuntimeError("validation failed on purpose")\n'
                f'{patch}\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name="__main__")\n')
        res = subprocess.run([sys.executable, '-c', code, *map(str, argv)], cwd=REPO, env=script_env(), capture_output=True, text=True,
                             timeout=300)
        assert res.returncode != 0 and 'validation failed on purpose' in res.stderr, res.stderr[-3000:]
        ck = load(tmp_path / name)
        assert (ck['epoch'], ck['iter']) == (1, 0), script


def test_checkpoint_every_few_minutes(tiny_shapes, tiny_vae_ckpt, tmp_path):
    """--ckpt_every_min alone (a tiny interval) writes mid-epoch checkpoints: the first one is mid-epoch."""
    out = tmp_path / 'run'
    run_and_kill_after_checkpoint(train_flags(tiny_shapes, tiny_vae_ckpt, out, '--bs=8', '--ep=2', '--ckpt_every_min=1e-6', '--ckpt_every_it=0'),
                                  out / 'ar-ckpt-last.pth', kill_at_iter=1)
    ck = load(out / 'ar-ckpt-last.pth')
    assert (ck['epoch'], ck['iter']) == (0, 1)


GRAD_CKPT_RUN = '''
import runpy, sys
try:   # the block class train.py's converted models run (cpu_kernels.convert), else the plain one
    import cpu_kernels.transformer as bv
except ImportError:
    import models.basic_var as bv
calls = [0]
forward = bv.AdaLNSelfAttn.forward
def counted(self, *a, **k):
    if self.training:
        calls[0] += 1
    return forward(self, *a, **k)
bv.AdaLNSelfAttn.forward = counted
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
print('BLOCK_TRAIN_FORWARDS', calls[0])
'''


def test_gradient_checkpointing_end_to_end(tiny_shapes, tiny_vae_ckpt, tmp_path):
    """--grad_ckpt=1 recomputes every block in the backward pass and trains to the same weights."""
    counts, weights = {}, {}
    for gc in (0, 1):
        out = tmp_path / f'gc{gc}'
        argv = train_flags(tiny_shapes, tiny_vae_ckpt, out, '--bs=8', '--ep=1', '--seed=0', '--tblr=3e-3', f'--grad_ckpt={gc}')
        res = subprocess.run([sys.executable, '-c', GRAD_CKPT_RUN, *map(str, argv)], cwd=REPO, env=script_env(), capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        counts[gc] = int(re.search(r'BLOCK_TRAIN_FORWARDS (\d+)', res.stdout).group(1))
        ck = load(out / 'ar-ckpt-last.pth')
        assert ck['args']['grad_ckpt'] == bool(gc)
        weights[gc] = ck['trainer']['var_wo_ddp']
    assert counts[0] == 3 * 2 and counts[1] == 2 * counts[0], counts   # 3 steps x 2 blocks, each recomputed once
    diff = [k for k in weights[0] if not torch.allclose(weights[0][k], weights[1][k], rtol=1e-5, atol=1e-6)]
    assert not diff, diff[:5]
