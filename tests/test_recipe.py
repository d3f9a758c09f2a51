"""The reference recipe: command lines and derived values, lr/wd schedules, no-weight-decay groups, batch sampling."""
import itertools
import math

import pytest
import torch

from conftest import build_tiny
from utils.arg_util import FlagError, parse_args
from utils.data_sampler import EvalShardSampler, GlobalBatchSampler
from utils.lr_control import filter_params, lr_factor, lr_wd_annealing, wd_at

REFERENCE_COMMANDS = {
    'd16': '--depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1',
    'd20': '--depth=20 --bs=768 --ep=250 --fp16=1 --alng=1e-3 --wpe=0.1',
    'd24': '--depth=24 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-4 --wpe=0.01',
    'd30': '--depth=30 --bs=1024 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08',
    'd36-s': '--depth=36 --saln=1 --pn=512 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=5e-6 --wpe=0.01 --twde=0.08',
}


@pytest.mark.parametrize('name', list(REFERENCE_COMMANDS))
def test_reference_command_lines(name):
    args = parse_args(REFERENCE_COMMANDS[name].split() + ['--data_path=/data/imagenet']).finalize(world_size=8)
    depth = int(name[1:3])
    assert args.depth == depth and args.fp16 == 1
    assert args.batch_size == args.bs // 8 and args.glb_batch_size == args.bs
    assert args.tlr == pytest.approx(args.tblr * args.bs / 256)
    assert args.wp == pytest.approx(args.ep / 50)
    assert args.pgwp == pytest.approx(args.ep / 300)
    assert args.twde == (0.08 if name in ('d30', 'd36-s') else args.twd)
    if name == 'd36-s':
        assert args.saln is True and args.patch_nums == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32) and args.data_load_reso == 512
    else:
        assert args.saln is False and args.patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) and args.data_load_reso == 256


def test_defaults_are_the_reference():
    a = parse_args([]).finalize(world_size=1)
    assert (a.tblr, a.twd, a.tclip, a.ls, a.bs, a.ac, a.ep, a.wp0, a.wpe, a.sche, a.opt) == (1e-4, 0.05, 2.0, 0.0, 768, 1, 250, 0.005, 0.01, 'lin0', 'adamw')
    assert (a.ini, a.hd, a.aln, a.alng, a.anorm, a.saln, a.fuse, a.afuse, a.hflip, a.mid_reso, a.patch_size) == (-1, 0.02, 0.5, 1e-5, True, False, True, True, False, 1.125, 16)
    assert (a.pg, a.pg0, a.vfast, a.tfast, a.tf32, a.seed, a.local_out_dir_path) == (0.0, 4, 0, 0, True, None, 'local_output')
    assert (a.vocab_size, a.z_channels, a.vae_ch, a.share_quant_resi, a.num_classes) == (4096, 32, 160, 4, 0)
    assert (a.ckpt_every_min, a.ckpt_every_it, a.ema, a.grad_ckpt) == (30, 0, 0, False)


def test_derived_values_and_flag_forms():
    a = parse_args(['--bs', '64', '--ac=2', '--hflip', '--saln=0', '--anorm=false', '--pn=1024', '--pg=0.3']).finalize(world_size=4)
    assert a.batch_size == 8 and a.glb_batch_size == 32 and a.bs == 64
    assert a.hflip is True and a.saln is False and a.anorm is False
    assert a.patch_nums[-1] == 64 and a.sche == 'lin0.3' and a.tlr == pytest.approx(1e-4 * 64 / 256)


def test_an_explicit_tlr_is_recomputed_as_in_the_reference_and_fixed_tlr_is_not(caplog):
    # the reference: tlr = ac * tblr * glb_batch_size / 256, whatever --tlr says
    a = parse_args(['--bs=64', '--ac=2', '--tblr=2e-4', '--tlr=0.5']).finalize(world_size=4)
    assert a.tlr == pytest.approx(2 * 2e-4 * 32 / 256)
    assert '--tlr=0.5 is ignored, as in the reference' in caplog.text and '--fixed_tlr=0.5' in caplog.text
    assert parse_args(['--bs=64', '--tblr=2e-4', '--fixed_tlr=0.5']).finalize(world_size=4).tlr == 0.5


@pytest.mark.parametrize('flag, message', [
    ('--ema=1', '--ema=1.0: must be in [0, 1)'), ('--ema=-0.1', '--ema=-0.1: must be in [0, 1)'),
    ('--sche=linear', "--sche=linear: unknown lr schedule 'linear'"), ('--sche=lin1.5', '--sche=lin1.5: unknown lr schedule'),
    ('--workers=-1', '--workers=-1: must be >= 0'), ('--ls=1', '--ls=1.0: must be in [0, 1)'), ('--ls=-0.1', '--ls=-0.1'),
    ('--pg=0.5 --pg0=10', '--pg0=10: must be in [0, 9] with --pg > 0'), ('--pg=0.5 --pg0=-1', '--pg0=-1'), ('--pg=1', '--pg=1.0: must be in [0, 1)'),
    ('--val_every_ep=0', '--val_every_ep=0: must be >= 1'), ('--tfast=5', '--tfast=5: use 0 (off)'), ('--tblr=0', '--tblr=0.0: must be > 0'),
    ('--nonfinite_patience=0', '--nonfinite_patience=0'), ('--wp0=2', '--wp0=2.0: must be in [0, 1]'), ('--mid_reso=0.5', '--mid_reso=0.5'),
    ('--fixed_tlr=-1', '--fixed_tlr=-1.0'), ('--depth=0', '--depth=0: must be >= 1'),
])
def test_flag_ranges_are_checked_with_the_flag_value_and_range(flag, message):
    with pytest.raises(FlagError) as e:
        parse_args(flag.split()).finalize(1)
    assert message in str(e.value)


def test_a_bad_flag_stops_train_py_before_any_file_is_read(tmp_path):
    from conftest import run_script
    res = run_script(['train.py', '--val_every_ep=0', '--data_path=/nonexistent/data', '--vae_ckpt=/nonexistent/vae.pth',
                      f'--local_out_dir_path={tmp_path}'], check=False)
    assert res.returncode == 1 and 'error: --val_every_ep=0: must be >= 1' in res.stderr, res.stderr[-2000:]
    assert 'Traceback' not in res.stderr and '/nonexistent' not in res.stderr


def test_tokens_path_with_a_data_path_says_which_is_used(tmp_path):
    from conftest import run_script
    res = run_script(['train.py', f'--tokens_path={tmp_path / "no_tokens"}', f'--data_path={tmp_path / "images"}', '--vae_ckpt=/nonexistent/vae.pth',
                      f'--local_out_dir_path={tmp_path / "out"}'], check=False)
    assert 'training from the token maps in --tokens_path; --data_path is not read' in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]


def test_unknown_and_bad_flags():
    with pytest.raises(SystemExit):
        parse_args(['--depht=16'])
    with pytest.raises(SystemExit):
        parse_args(['--saln=maybe'])
    with pytest.raises(FlagError, match='--fp16=3'):
        parse_args(['--fp16=3']).finalize(1)
    with pytest.raises(FlagError, match='--pn'):
        parse_args(['--pn=1_3_2']).finalize(1)
    with pytest.raises(FlagError, match='patch_size must be 16'):
        parse_args(['--patch_size=8']).finalize(1)


def test_lr_schedules_exact_values():
    # warm-up: linear from wp0 to 1
    assert lr_factor('lin0', 0, wp_it=10, max_it=110, wp0=0.005) == pytest.approx(0.005)
    assert lr_factor('lin0', 5, wp_it=10, max_it=110, wp0=0.005) == pytest.approx(0.005 + 0.995 * 0.5)
    # lin0: flat for the first 5% after warm-up, then linear to wpe at the last iteration
    assert lr_factor('lin0', 10, 10, 111, wpe=0.1) == 1
    assert lr_factor('lin0', 110, 10, 111, wpe=0.1) == pytest.approx(0.1)
    assert lr_factor('lin0', 60, 10, 111, wpe=0.1) == pytest.approx(0.1 + 0.9 * 0.5 / 0.95)
    assert lr_factor('lin00', 60, 10, 111, wpe=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor('cos', 60, 10, 111, wpe=0.0) == pytest.approx(0.5)
    assert lr_factor('lin', 20, 10, 111, wpe=0.1) == 1
    assert lr_factor('exp', 110, 10, 111, wpe=0.01) == pytest.approx(0.01)
    # linX: falls from 1 to a midpoint over the first X, then to wpe
    mid = (1 + 0.1 + 0.9 * 0.7) / 2
    assert lr_factor('lin0.3', 40, 10, 111, wpe=0.1) == pytest.approx(mid)
    assert lr_factor('lin0.3', 110, 10, 111, wpe=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match='unknown lr schedule'):
        lr_factor('linear', 50, 10, 111)
    # weight decay: half cosine from twd to twde
    assert wd_at(0, 101, 0.05, 0.2) == pytest.approx(0.05)
    assert wd_at(50, 101, 0.05, 0.2) == pytest.approx(0.125)
    assert wd_at(100, 101, 0.05, 0.2) == pytest.approx(0.2)


def test_no_weight_decay_groups_and_annealing():
    _, var = build_tiny(shared_aln=True)
    names, paras, groups = filter_params(var)
    nd = {n for n, p in var.named_parameters() if any(p is q for g in groups if g['wd_sc'] == 0 for q in g['params'])}
    for n in names:
        expect_nd = (var.get_parameter(n).ndim == 1 or n.endswith('bias') or
                     any(k in n for k in ('pos_1LC', 'pos_start', 'lvl_embed', 'ada_gss', 'scale_mul')))
        assert (n in nd) == expect_nd, n
    assert 'class_emb.weight' not in nd and 'blocks.0.attn.mat_qkv.weight' not in nd and 'blocks.0.ada_gss' in nd
    opt = torch.optim.AdamW(groups, lr=1.0)
    lo, hi, wlo, whi = lr_wd_annealing('lin0', opt, peak_lr=2.0, wd=0.05, wd_end=0.05, cur_it=50, wp_it=10, max_it=100)
    assert hi == lo == 2.0 * lr_factor('lin0', 50, 10, 100) and whi == wlo == pytest.approx(0.05)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.0, pytest.approx(0.05)]   # the reference's order: pos_start comes first


@pytest.mark.parametrize('world', [2, 4])
def test_every_process_reads_its_share_of_the_same_global_batches(world):
    n, G = 37, 8
    one = GlobalBatchSampler(n, G, world_size=1, rank=0, seed=3)
    many = [GlobalBatchSampler(n, G, world_size=world, rank=r, seed=3) for r in range(world)]
    its = len(one)
    assert its == math.ceil(n / G)
    ref = list(itertools.islice(iter(one), 3 * its))
    shares = [list(itertools.islice(iter(s), 3 * its)) for s in many]
    for i in range(3 * its):
        assert sum((sh[i] for sh in shares), []) == ref[i]
    # every image once per epoch (the last batch is filled by wrapping around)
    first_epoch = [idx for b in ref[:its] for _, idx in b]
    assert set(first_epoch) == set(range(n)) and len(first_epoch) == its * G
    assert {e for b in ref[its:2 * its] for e, _ in b} == {1}
    assert ref[its] != ref[0]  # a new order every epoch


def test_sampler_resumes_mid_epoch():
    s = GlobalBatchSampler(50, 4, seed=1)
    full = list(itertools.islice(iter(s), 40))
    resumed = list(itertools.islice(iter(GlobalBatchSampler(50, 4, seed=1, start_ep=1, start_it=5)), 10))
    assert resumed == full[len(s) + 5:len(s) + 15]


def test_eval_shards_cover_everything_once():
    for n, w in ((10, 3), (2, 4), (7, 1)):
        idx = sum((list(EvalShardSampler(n, w, r)) for r in range(w)), [])
        assert idx == list(range(n))


def test_iteration_plan_of_a_fresh_a_resumed_and_a_finished_run():
    from utils.run import plan_iterations
    fresh = plan_iterations(ep=10, wp=0.5, iters_train=40, start_ep=0, start_it=0)
    assert (fresh.max_it, fresh.wp_it, fresh.start_g_it, fresh.log_every) == (400, 20.0, 0, 4)
    resumed = plan_iterations(ep=10, wp=0.5, iters_train=40, start_ep=3, start_it=7)
    assert resumed.start_g_it == 3 * 40 + 7 and resumed.max_it == 400
    assert plan_iterations(ep=2, wp=0, iters_train=5, start_ep=1, start_it=2).log_every == 1   # fewer than 10 iterations an epoch
    assert plan_iterations(ep=10, wp=0.5, iters_train=40, start_ep=10, start_it=0) is None


# ---------------------------------------------------------------------- the trainer's recipe

def tiny_trainer(*flags, seed=0):
    """The tiny models and the trainer train.py builds for these flags."""
    from conftest import TINY_TRAIN_FLAGS
    from train import build_trainer
    vae, var = build_tiny(fast=True, seed=seed)   # converted, as train.py's
    args = parse_args(TINY_TRAIN_FLAGS + ['--afuse=0', *flags]).finalize(world_size=1)
    return build_trainer(args, torch.device('cpu'), vae, var, var), vae, var


def tiny_batch(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, 64, 64, generator=g) * 2 - 1, torch.randint(0, 5, (B,), generator=g)


def test_label_smoothing_gives_the_label_smoothed_cross_entropy():
    trainer, _, var = tiny_trainer('--ls=0.1')
    var.train()
    img, label = tiny_batch()
    torch.manual_seed(0)
    out = trainer.train_step(0, True, label, inp_B3HW=img)
    logp = out['logits_BLV'].float().log_softmax(-1)                       # (B, L, V)
    nll = -logp.gather(-1, out['gt_BL'].unsqueeze(-1)).squeeze(-1)          # (B, L)
    smoothed = 0.9 * nll + 0.1 * (-logp.mean(-1))                           # every token weighs 1/L
    assert out['loss'].item() == pytest.approx(smoothed.mean().item(), rel=1e-5)
    assert abs(out['loss'].item() - nll.mean().item()) > 1e-3


def test_ema_decay_is_applied_as_stated():
    trainer, _, var = tiny_trainer('--ema=0.9')
    var.train()
    ema_before = [p.clone() for p in trainer.ema.params]
    img, label = tiny_batch()
    torch.manual_seed(0)
    trainer.train_step(0, True, label, inp_B3HW=img)
    ema = trainer.ema.state_dict(var)
    for (name, p), e0 in zip(var.named_parameters(), ema_before):
        torch.testing.assert_close(ema[name], 0.9 * e0 + 0.1 * p.detach(), rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(ema[n], p) for n, p in var.named_parameters())


def test_validation_runs_in_float32_whatever_the_training_precision():
    import torch.nn.functional as F
    trainer, vae, var = tiny_trainer('--fp16=2')
    var.cond_drop_rate = 0.0
    batches = [tiny_batch(B=3, seed=s) for s in range(2)]
    vL_mean, vL_tail, vacc_mean, _, tot, _ = trainer.eval_ep(batches)
    losses, tails, accs = [], [], []
    with torch.no_grad():
        for img, label in batches:
            idx_Bl = vae.img_to_idxBl(img)
            gt_BL = torch.cat(idx_Bl, 1)
            logits_BLV = var(label, vae.quantize.idxBl_to_var_input(idx_Bl))
            assert logits_BLV.dtype == torch.float32
            losses.append(F.cross_entropy(logits_BLV.flatten(0, 1), gt_BL.flatten()).item())
            tails.append(F.cross_entropy(logits_BLV[:, -16:].flatten(0, 1), gt_BL[:, -16:].flatten()).item())
            accs.append((logits_BLV.argmax(-1) == gt_BL).float().mean().item() * 100)
    assert tot == 6
    assert vL_mean == pytest.approx(sum(losses) / 2, rel=1e-6) and vL_tail == pytest.approx(sum(tails) / 2, rel=1e-6)
    assert vacc_mean == pytest.approx(sum(accs) / 2, rel=1e-6)


# ---------------------------------------------------------------------- the float16 loss scaler

MAX_SCALE = 2.0 ** 15


def reference_scale_sequence(overflows, scale, tracker, interval=1000):
    """The reference AMP optimizer's rule, written out: after scaler.step, a used scale above 2^15 sets the next to 2^15
    (the growth tracker untouched); otherwise GradScaler.update: halve and reset on overflow, double after `interval` finite steps."""
    seq = []
    for overflow in overflows:
        used = scale
        if used > MAX_SCALE:
            scale = MAX_SCALE
        elif overflow:
            scale, tracker = used * 0.5, 0
        else:
            tracker += 1
            if tracker == interval:
                scale, tracker = used * 2, 0
        seq.append((math.log2(used), overflow))
    return seq, scale, tracker


OVERFLOWS = [False, False, False, False, True, False, False, True, False]


def our_scale_sequence(overflows, scale, tracker):
    from utils.amp_opt import AmpOptimizer
    p = torch.nn.Parameter(torch.ones(4))
    opt = AmpOptimizer('cpu', 1, torch.optim.AdamW([p], lr=0.1), ['p'], [p], grad_clip=2.0)
    sd = opt.scaler.state_dict()
    opt.scaler.load_state_dict({**sd, 'scale': scale, '_growth_tracker': tracker})
    seq, values = [], []
    for overflow in overflows:
        before = p.detach().clone()
        loss = (p * (float('inf') if overflow else 1.0)).sum()
        _, scale_log2, skipped = opt.backward_clip_step(stepping=True, loss=loss)
        seq.append((scale_log2, skipped))
        values.append(torch.equal(before, p.detach()))
    sd = opt.scaler.state_dict()
    return seq, sd['scale'], sd['_growth_tracker'], values


def test_fp16_loss_scale_sequence_is_the_reference_one():
    # two finite steps from the cap: the scale grows to 2^16, is used once, then reset to 2^15; overflows halve it
    expected, scale, tracker = reference_scale_sequence(OVERFLOWS, MAX_SCALE, 998)
    got, got_scale, got_tracker, unchanged = our_scale_sequence(OVERFLOWS, MAX_SCALE, 998)
    assert got == expected, (got, expected)
    assert (got_scale, got_tracker) == (scale, tracker)
    assert unchanged == OVERFLOWS   # the weights move exactly on the steps that were not skipped
    assert max(s for s, _ in got) == 16   # the step after the growth used 2^16, and logs it


def test_fp16_loss_scale_matches_the_reference_class_when_its_code_is_here(tmp_path):
    """Run the reference's own AmpOptimizer (CPU scaler in place of its CUDA one) on the same sequence."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    from conftest import REPO
    ref = Path(os.environ.get('VAR_REFERENCE_CODE', REPO.parent / 'ref_var'))
    if not (ref / 'utils' / 'amp_sc.py').is_file():
        pytest.skip(f'the reference code is not at {ref} (set VAR_REFERENCE_CODE; the self-contained test above checks the same rule)')
    script = tmp_path / 'run_ref.py'
    script.write_text(f"""
import json, sys, torch
torch.cuda.amp.GradScaler = lambda **kw: torch.amp.GradScaler('cpu', **kw)
sys.path.insert(0, {str(ref)!r})
from utils.amp_sc import AmpOptimizer
p = torch.nn.Parameter(torch.ones(4))
opt = AmpOptimizer(1, torch.optim.AdamW([p], lr=0.1), ['p'], [p], grad_clip=2.0)
opt.scaler.load_state_dict({{**opt.scaler.state_dict(), 'scale': {MAX_SCALE}, '_growth_tracker': 998}})
seq = []
for overflow in {OVERFLOWS!r}:
    _, scale_log2 = opt.backward_clip_step(stepping=True, loss=(p * (float('inf') if overflow else 1.0)).sum())
    seq.append(scale_log2)
print(json.dumps([seq, opt.scaler.state_dict()['scale']]))
""")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    ref_seq, ref_scale = json.loads(res.stdout.strip().splitlines()[-1])
    got, got_scale, _, _ = our_scale_sequence(OVERFLOWS, MAX_SCALE, 998)
    assert [s for s, _ in got] == ref_seq and got_scale == ref_scale


@pytest.mark.parametrize('saved_fp16, now_fp16', [(0, 1), (1, 2), (2, 1), (1, 0)])
def test_resuming_in_another_fp16_mode_converts_and_says_so(saved_fp16, now_fp16, caplog):
    saved, _, var = tiny_trainer(f'--fp16={saved_fp16}')
    img, label = tiny_batch()
    var.train()
    saved.train_step(0, True, label, inp_B3HW=img)
    sd = saved.state_dict()
    now, _, _ = tiny_trainer(f'--fp16={now_fp16}', seed=1)
    now.load_state_dict(sd, strict=True)
    if now_fp16 == 1:
        assert now.var_opt.scaler.get_scale() == 2.0 ** 11 and 'loss scaler starts afresh at 2^11' in caplog.text
    else:
        assert 'its loss-scaler state (scale 2048) is dropped' in caplog.text
    exp_avg = [s['exp_avg'] for s in now.var_opt.optimizer.state.values()]
    assert len(exp_avg) == len(list(var.parameters())) and all(e.abs().sum() > 0 for e in exp_avg if e.numel() > 1)
