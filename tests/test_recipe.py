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
    a = parse_args(['--bs', '64', '--ac=2', '--hflip', '--saln=0', '--anorm=false', '--pn=1024', '--pg=0.3', '--tlr=0.5']).finalize(world_size=4)
    assert a.batch_size == 8 and a.glb_batch_size == 32 and a.bs == 64
    assert a.hflip is True and a.saln is False and a.anorm is False
    assert a.patch_nums[-1] == 64 and a.sche == 'lin0.3' and a.tlr == 0.5


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
    assert [g['weight_decay'] for g in opt.param_groups] == [pytest.approx(0.05), 0.0]


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
