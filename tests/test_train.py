"""train.py end to end on the CPU: torchrun with gloo, checkpoints, resume after SIGKILL, mixed precision, bad input."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TRAIN_FLAGS, run_and_kill_after_checkpoint, run_script, script_env


def train_flags(data, vae, out, *extra):
    return ['train.py', f'--data_path={data}', f'--vae_ckpt={vae}', f'--local_out_dir_path={out}', *TINY_TRAIN_FLAGS, *extra]


def read_scalars(tb_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = {}
    for d in [p for p in tb_dir.iterdir() if p.is_dir() and p.name.startswith('tb-')]:
        acc = EventAccumulator(str(d))
        acc.Reload()
        for tag in acc.Tags()['scalars']:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in scalars.items()}


def final_weights(out: Path):
    ck = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    return ck, ck['trainer']['var_wo_ddp']


def lin0_lr(g_it, peak, wp_it, max_it, wp0=0.005, wpe=0.01):
    """The reference's lin0 schedule, written out: linear warm-up from wp0, flat for 5 % of the rest, then linear to wpe."""
    wp_it = round(wp_it)
    if g_it < wp_it:
        return peak * (wp0 + (1 - wp0) * g_it / wp_it)
    passed = (g_it - wp_it) / (max_it - 1 - wp_it)
    return peak * (1 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95)


def test_two_process_torchrun_gloo(shapes_data, tiny_vae_ckpt, tmp_path):
    out = tmp_path / 'run'
    flags = ['--bs=8', '--ep=6', '--tblr=3e-3', '--wp=0.5', '--ema=0.9', '--val_every_ep=3', '--seed=7']
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags), torchrun_procs=2, timeout=600)
    # outputs
    for name in ('ar-ckpt-last.pth', 'ar-ckpt-best.pth', 'log.txt', 'stdout.txt'):
        assert (out / name).is_file(), name
    lines = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    epochs = [r for r in lines if not r.get('eval')]
    evals = [r for r in lines if r.get('eval')]
    assert [r['ep'] for r in epochs] == [1, 2, 3, 4, 5, 6] and [r['ep'] for r in evals] == [3, 6]
    assert all(r['val_images'] == 24 for r in evals)  # every val image once, shared by the two processes
    assert 'process group: rank 0 of 2, backend gloo' in (out / 'stdout.txt').read_text()
    # the loss falls (a fixed seed: the same run every time)
    assert epochs[-1]['L_mean'] < epochs[0]['L_mean'] - 0.05, [r['L_mean'] for r in epochs]
    # ar-ckpt-best.pth is the checkpoint of the epoch with the lowest validation loss (last scale) in log.txt
    best = torch.load(out / 'ar-ckpt-best.pth', map_location='cpu', weights_only=True)
    assert best['epoch'] == min(evals, key=lambda r: r['vL_tail'])['ep']
    assert best['best']['vL_tail'] == pytest.approx(min(r['vL_tail'] for r in evals), abs=1e-5)
    # tensorboard: loss, accuracy (total, last scale, per scale), lr, wd, grad norm, speed
    sc = read_scalars(out)
    for tag in ('AR_iter_loss/L_mean', 'AR_iter_loss/L_tail', 'AR_iter_loss/acc_mean', 'AR_iter_loss/acc_tail', 'AR_iter_loss/L_16',
                'AR_iter_loss/acc_64', 'AR_opt/lr_max', 'AR_opt/wd_max', 'AR_opt/grad_norm', 'AR_speed/images_per_sec', 'AR_ep_loss/vL_tail'):
        assert tag in sc, f'{tag} missing from tensorboard ({sorted(sc)})'
    losses = [v for _, v in sc['AR_iter_loss/L_mean']]
    assert losses[-1] < losses[0]
    # the logged lr is the schedule's: peak tblr x bs / 256, 0.5 warm-up epochs of 12 iterations, 72 iterations in all
    lrs = sc['AR_opt/lr_max']
    assert len(lrs) >= 6 * 10
    for g_it, lr in lrs:
        assert lr == pytest.approx(lin0_lr(g_it, 3e-3 * 8 / 256, wp_it=6, max_it=72), rel=1e-5), g_it
    assert epochs[-1]['tlr'] == pytest.approx(lin0_lr(71, 3e-3 * 8 / 256, wp_it=6, max_it=72), rel=1e-6)
    # the checkpoint: the reference layout plus EMA weights, args and position
    ck, var_sd = final_weights(out)
    assert ck['epoch'] == 6 and ck['iter'] == 0
    assert set(ck['trainer']) >= {'config', 'var_wo_ddp', 'vae_local', 'var_opt', 'var_ema'}
    assert ck['sampler'] == {'epoch': 6, 'iter': 0, 'glb_batch_size': 8, 'seed': 0} and ck['rng']['seed'] == ck['args']['seed'] == 7
    assert ck['args']['world_size'] == 2 and ck['args']['batch_size'] == 4
    # and it samples after a strict load into build_vae_var
    from models import build_vae_var
    vae, var = build_vae_var(device='cpu', V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=6, depth=2)
    vae.load_state_dict(ck['trainer']['vae_local'], strict=True)
    var.load_state_dict(var_sd, strict=True)
    var.load_state_dict(ck['trainer']['var_ema'], strict=True)
    img = var.autoregressive_infer_cfg(B=2, label_B=3, g_seed=0, cfg=1.5, top_k=10, top_p=0.9)
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()
    # rerunning the finished command does nothing
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags))
    assert 'training already finished' in res.stdout


def test_sigkill_and_resume_gives_the_same_weights(shapes_data, tiny_vae_ckpt, tmp_path):
    flags = ['--bs=4', '--ep=3', '--tblr=3e-3', '--ckpt_every_it=7', '--workers=0', '--seed=5', '--hflip=1', '--ema=0.95']
    ref = tmp_path / 'uninterrupted'
    run_script(train_flags(shapes_data, tiny_vae_ckpt, ref, *flags))

    out = tmp_path / 'killed'
    # 24 iterations per epoch, a checkpoint every 7: the process kills itself right after the one at iteration 35
    run_and_kill_after_checkpoint(train_flags(shapes_data, tiny_vae_ckpt, out, *flags), out / 'ar-ckpt-last.pth', kill_at_iter=30)
    ck_at_kill = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ck_at_kill['epoch'], ck_at_kill['iter']) == (1, 11), 'the kill must land mid-epoch, after the checkpoint at iteration 35'
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags))
    assert 'resuming from' in res.stdout and 'ar-ckpt-last.pth at epoch 1, iteration 11' in res.stdout, 'a mid-epoch resume'

    ck_ref, w_ref = final_weights(ref)
    ck_res, w_res = final_weights(out)
    assert w_ref.keys() == w_res.keys()
    diff = [k for k in w_ref if not torch.equal(w_ref[k], w_res[k])]
    assert not diff, f'weights differ after the resume: {diff[:5]}'
    ema_diff = [k for k in w_ref if not torch.equal(ck_ref['trainer']['var_ema'][k], ck_res['trainer']['var_ema'][k])]
    assert not ema_diff
    opt_ref, opt_res = ck_ref['trainer']['var_opt']['optimizer']['state'], ck_res['trainer']['var_opt']['optimizer']['state']
    assert all(torch.equal(opt_ref[i]['exp_avg'], opt_res[i]['exp_avg']) for i in opt_ref)


def test_damaged_newest_checkpoint_falls_back_to_the_previous(shapes_data, tiny_vae_ckpt, tmp_path):
    out = tmp_path / 'run'
    flags = ['--bs=8', '--ep=2', '--seed=1']
    run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags))
    assert (out / 'ar-ckpt-prev.pth').is_file()
    prev = torch.load(out / 'ar-ckpt-prev.pth', map_location='cpu', weights_only=True)
    assert (prev['epoch'], prev['iter']) == (1, 0)
    data = (out / 'ar-ckpt-last.pth').read_bytes()
    (out / 'ar-ckpt-last.pth').write_bytes(data[: len(data) // 3])   # truncated, as by a full disk
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *flags))
    assert 'ar-ckpt-last.pth is damaged' in res.stdout + res.stderr
    assert 'resuming from' in res.stdout and 'ar-ckpt-prev.pth at epoch 1, iteration 0' in res.stdout
    ck = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ck['epoch'], ck['iter']) == (2, 0)


def test_resume_with_another_world_size_and_another_model(shapes_data, tiny_vae_ckpt, tmp_path):
    out = tmp_path / 'run'
    run_script(train_flags(shapes_data, tiny_vae_ckpt, out, '--bs=8', '--ep=1', '--seed=2'))
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, '--bs=8', '--ep=2', '--seed=2'), torchrun_procs=2)
    assert 'resuming with 2 processes (the checkpoint was written with 1): the global batch of 8 images per step is kept, 4 per process' in res.stdout
    ck = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert ck['epoch'] == 2 and ck['args']['world_size'] == 2 and ck['args']['bs'] == 8
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, '--bs=8', '--ep=3', '--seed=2').__add__(['--depth=3']), check=False)
    assert res.returncode != 0
    assert 'another model configuration: --depth: checkpoint 2, now 3' in res.stderr


# one epoch of 12 optimizer steps at a constant lr (wp0 = wpe = 1), so that runs with other micro steps compare
BASELINE_FLAGS = ['--bs=8', '--ep=1', '--seed=3', '--tblr=3e-3', '--wp0=1', '--wpe=1']

def weight_distance(a, b):
    keys = [k for k, v in a.items() if v.is_floating_point() and k != 'attn_bias_for_masking']
    return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys).sqrt().item()


def initial_weights(seed):
    """The weights train.py starts from (torch.manual_seed(seed), then build_vae_var)."""
    from models import build_vae_var
    torch.manual_seed(seed)
    _, var = build_vae_var(device='cpu', V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=6, depth=2)
    return var.state_dict()


@pytest.fixture(scope='module')
def fp32_run(shapes_data, tiny_vae_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp('fp32')
    run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *BASELINE_FLAGS))
    return out


@pytest.mark.parametrize('fp16', [1, 2])
def test_mixed_precision_on_cpu(shapes_data, tiny_vae_ckpt, tmp_path, fp16, fp32_run):
    out = tmp_path / f'fp16_{fp16}'
    run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *BASELINE_FLAGS, f'--fp16={fp16}'))
    ck, w = final_weights(out)
    assert all(torch.isfinite(v).all() for k, v in w.items() if v.is_floating_point() and k != 'attn_bias_for_masking')
    assert ck['args']['fp16'] == fp16
    # the same seed in float32: close to it (a small fraction of how far training moved), and not equal (autocast was on)
    _, w32 = final_weights(fp32_run)
    moved = weight_distance(w32, initial_weights(3))
    assert 0 < weight_distance(w, w32) < 0.1 * moved, (weight_distance(w, w32), moved)
    assert any(not torch.equal(w[k], w32[k]) for k in w)
    sc = read_scalars(out)
    losses = [v for _, v in sc['AR_iter_loss/L_mean']]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.02, losses
    if fp16 == 1:   # 12 finite steps: the scaler stays at its initial 2^11, and every step logs the scale it used
        assert [v for _, v in sc['AR_opt/loss_scale_log2']] == [11.0] * 12
        scaler = ck['trainer']['var_opt']['scaler']
        assert scaler['scale'] == 2.0 ** 11 and scaler['_growth_tracker'] == 12
    else:
        assert 'scaler' not in ck['trainer']['var_opt']


def test_gradient_accumulation_matches_one_big_batch(shapes_data, tiny_vae_ckpt, tmp_path, fp32_run):
    out = tmp_path / 'ac2'
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, *BASELINE_FLAGS, '--ac=2'))
    assert 'global batch 8 (4 per process, 2 accumulation steps)' in res.stdout
    ck, w = final_weights(out)
    assert ck['epoch'] == 1 and ck['trainer']['var_opt']['optimizer']['state'][0]['step'].item() == 12   # 12 optimizer steps
    # the same images per optimizer step: the gradient norms agree step by step (the sum of the two halves, divided by 2)
    norms32 = [v for _, v in read_scalars(fp32_run)['AR_opt/grad_norm']]
    norms_ac = [v for _, v in read_scalars(out)['AR_opt/grad_norm']]
    assert len(norms32) == len(norms_ac) == 12
    for a, b in zip(norms32, norms_ac):
        assert b == pytest.approx(a, rel=0.02), (norms32, norms_ac)
    # and the weights: each micro step draws its own condition dropout and drop path, so close, not equal
    _, w32 = final_weights(fp32_run)
    moved = weight_distance(w32, initial_weights(3))
    assert weight_distance(w, w32) < 0.25 * moved, (weight_distance(w, w32), moved)


def reference_progressive_schedule(n_iters, iters_train, ep, pg, pg0, pgwp, n_scales):
    """(prog_si, prog_wp) of every iteration by the reference's rule, written out (prog_si -1 once the last scale is reached)."""
    wp_it, max_it, prog_wp_it = ep / 50 * iters_train, ep * iters_train, pgwp * iters_train
    seq, last_si, prog_it, first = [], -1, 0, True
    for g in range(n_iters):
        if g <= wp_it:
            si = pg0
        elif g >= max_it * pg:
            si = n_scales - 1
        else:
            si = pg0 + round(min(max((g - wp_it) / (max_it * pg - wp_it), 0), 1) * (n_scales - 1 - pg0))
        if si != last_si:
            first = first and last_si == -1
            last_si, prog_it = si, 0
        prog_it += 1
        wp = 1 if first else max(min(prog_it / prog_wp_it, 1), 0.01)
        seq.append((-1 if si == n_scales - 1 else si, wp))
    return seq


def test_progressive_training_follows_the_schedule(shapes_data, tiny_vae_ckpt, tmp_path):
    out = tmp_path / 'run'
    run_script(train_flags(shapes_data, tiny_vae_ckpt, out, '--bs=8', '--ep=2', '--pg=0.5', '--pg0=1', '--pgwp=0.2', '--seed=1'))
    sc = read_scalars(out)
    got = list(zip([v for _, v in sc['AR_iter_schedule/prog_si']], [v for _, v in sc['AR_iter_schedule/prog_wp']]))
    assert [s for s, _ in sc['AR_iter_schedule/prog_si']] == list(range(24))   # every iteration logged
    expected = reference_progressive_schedule(24, iters_train=12, ep=2, pg=0.5, pg0=1, pgwp=0.2, n_scales=4)
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-6)
    assert {s for s, _ in got} == {1, 2, -1} and 0.01 < min(w for _, w in got) < 1   # stages 1, 2 then all, with a warm-up


def test_non_finite_training_stops_without_a_broken_checkpoint(shapes_data, tiny_vae_ckpt, tmp_path):
    """A checkpoint every iteration; the first (huge) step is good, then every step is skipped until the patience runs out."""
    out = tmp_path / 'run'
    res = run_script(train_flags(shapes_data, tiny_vae_ckpt, out, '--bs=8', '--ep=3', '--tblr=1e35', '--tclip=0', '--seed=0',
                                 '--ckpt_every_it=1', '--nonfinite_patience=3'), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    skipped = [int(i) for i in re.findall(r'iteration (\d+): non-finite gradient .* optimizer step skipped', res.stdout)]
    assert skipped == [1, 2, 3], 'exactly the patience of skipped steps, in a row'
    assert 'training stopped: 3 optimizer steps in a row had a non-finite loss or gradient (the last at iteration 3)' in res.stderr
    assert f'The last checkpoint, {out / "ar-ckpt-last.pth"}, holds finite weights from before these steps' in res.stderr
    ck = torch.load(out / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert (ck['epoch'], ck['iter']) == (0, skipped[0]), 'the checkpoint holds the state before the first skipped step'
    w = ck['trainer']['var_wo_ddp']
    assert all(torch.isfinite(v).all() for k, v in w.items() if v.is_floating_point() and k != 'attn_bias_for_masking')


@pytest.mark.parametrize('setup, message', [
    ('missing', 'does not exist; expected DATA_PATH/train/<class>/<image>'),
    ('no_val', 'has no val/ folder'),
    ('empty', 'has no class subfolders'),
    ('no_images', 'has 2 class folders but no images'),
    ('val_differs', 'only in train: [\'b\'], only in val: [\'c\']'),
])
def test_bad_data_folders(tmp_path, tiny_vae_ckpt, setup, message):
    from PIL import Image
    data = tmp_path / 'data'
    if setup != 'missing':
        (data / 'train').mkdir(parents=True)
        if setup != 'no_val':
            (data / 'val').mkdir()
    if setup in ('no_images', 'val_differs'):
        for c in ('a', 'b'):
            (data / 'train' / c).mkdir()
    if setup == 'val_differs':
        for c in ('a', 'c'):
            (data / 'val' / c).mkdir()
        for split, c in (('train', 'a'), ('train', 'b'), ('val', 'a'), ('val', 'c')):
            Image.new('RGB', (64, 64)).save(data / split / c / 'x.png')
    if setup == 'empty':
        pass
    res = run_script(train_flags(data, tiny_vae_ckpt, tmp_path / 'out', '--ep=1'), check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr[-2000:]


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_vae_ckpt):
    from utils.toy_data import make_shapes_dataset
    data = tmp_path / 'data'
    make_shapes_dataset(str(data), train_per_class=3, val_per_class=1, size=64, n_shapes=1, n_colours=2)
    bad = data / 'train' / 'red_circle' / '00001.png'
    bad.write_bytes(b'not a png at all')
    res = run_script(train_flags(data, tiny_vae_ckpt, tmp_path / 'out', '--bs=2', '--ep=2', '--workers=2'))
    assert f'skipping unreadable image {bad}' in res.stdout + res.stderr
    lines = [json.loads(x) for x in (tmp_path / 'out' / 'log.txt').read_text().splitlines() if '"eval"' not in x]
    assert lines[-1]['skipped_images'] >= 1


def test_unknown_flag_is_an_error(tmp_path):
    res = run_script(['train.py', '--depht=16', f'--local_out_dir_path={tmp_path}'], check=False)
    assert res.returncode == 2 and 'unrecognized arguments: --depht=16' in res.stderr


def test_offline_vae_download_error(shapes_data, tmp_path):
    res = run_script([str(REPO / 'train.py'), f'--data_path={shapes_data}', f'--local_out_dir_path={tmp_path / "out"}', '--depth=2', '--pn=1_2_3_4',
                      '--vae_ckpt=vae_ch160v4096z32.pth'], check=False,
                     env=script_env(HF_HOME=tmp_path / 'hf'), cwd=tmp_path)
    assert res.returncode != 0
    assert 'vae_ch160v4096z32.pth is not at vae_ch160v4096z32.pth and could not be downloaded from the Hugging Face repo FoundationVision/var' in res.stderr
    assert 'If this machine is offline, download https://huggingface.co/FoundationVision/var/resolve/main/vae_ch160v4096z32.pth' in res.stderr
