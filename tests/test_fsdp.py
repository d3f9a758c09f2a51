"""--fsdp=1 (FSDP2, DCP checkpoint folders) end to end on the CPU: real torchrun processes with gloo, tiny models.

Equal to DDP; a SIGKILL and a restart give the uninterrupted run's weights bitwise; a checkpoint of 2 processes resumes on
1 and of 1 on 2 (DCP reshards); a damaged shard file is found by its sha256 and the previous checkpoint used; the
consolidated single file loads strictly into build_vae_var's models; train_vae.py --fsdp=1 runs and resumes.
"""
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import dist
from conftest import REPO, TINY_TRAIN_FLAGS, run_script, script_env

# 24 training images, global batch 8 in 2 accumulation steps: 6 micro steps an epoch, 12 in all
FLAGS = ['--bs=8', '--ac=2', '--ep=2', '--tblr=3e-3', '--ckpt_every_it=2', '--workers=0', '--seed=5', '--hflip=1', '--ema=0.95']
QUIET = ['--vis_every_ep=-1', '--save_pretrained=0']   # no tensorboard grid, no pretrained folder: output only, same weights


def train_flags(data, vae, out, *extra):
    return ['train.py', f'--data_path={data}', f'--vae_ckpt={vae}', f'--local_out_dir_path={out}', *TINY_TRAIN_FLAGS, *extra]


def run_procs(argv, procs, env=None, check=True, timeout=240):
    """`python argv` as `procs` processes of one gloo group (the environment torchrun would set, without its agent process:
    a second or two less per run); (return code, rank 0's stdout, rank 0's stderr)."""
    if procs == 1:
        res = run_script(argv, env=env, check=check, timeout=timeout)
        return subprocess.CompletedProcess(res.args, res.returncode, res.stdout, res.stderr)
    with tempfile.TemporaryDirectory() as logs:
        procs_logs = []
        for rank, e in enumerate(dist.local_group_envs(procs, env or script_env())):
            out, err = open(Path(logs) / f'{rank}.out', 'w+'), open(Path(logs) / f'{rank}.err', 'w+')
            procs_logs.append((subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=e, stdout=out, stderr=err), out, err))
        codes = []
        for p, out, err in procs_logs:
            try:
                codes.append(p.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                for q, _, _ in procs_logs:
                    q.kill()
                raise
        texts = []
        for _, out, err in procs_logs:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
            out.close(), err.close()
    rc = next((c for c in codes if c != 0), 0)
    if check and rc != 0:
        raise AssertionError(f'{argv} on {procs} processes failed ({codes}):\n' + '\n'.join(f'--- rank {r}\n{o[-3000:]}\n{e[-3000:]}'
                                                                                     for r, (o, e) in enumerate(texts)))
    return subprocess.CompletedProcess(argv, rc, *texts[0])


def train(data, vae, out, procs, *extra, env=None, check=True):
    return run_procs(train_flags(data, vae, out, *extra), procs, env=env, check=check)


def consolidated(folder: Path, out: Path = None) -> dict:
    """tools/consolidate_ckpt.py's single file of a checkpoint folder, loaded."""
    from tools.consolidate_ckpt import consolidate
    out = out or folder.parent.parent / f'{folder.parent.name}-{folder.name}.pth'
    consolidate(str(folder), str(out))
    return torch.load(out, map_location='cpu', weights_only=True)


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in a)


def assert_same_state(ck_a: dict, ck_b: dict, rel: float = 0.0) -> None:
    """Weights, EMA and Adam moments equal (rel 0: bitwise), and at the same point of training."""
    assert (ck_a['epoch'], ck_a['iter']) == (ck_b['epoch'], ck_b['iter'])
    ta, tb = ck_a['trainer'], ck_b['trainer']
    opt_a, opt_b = ta['var_opt']['optimizer']['state'], tb['var_opt']['optimizer']['state']
    for name, a, b in [('weights', ta['var_wo_ddp'], tb['var_wo_ddp']), ('EMA', ta['var_ema'], tb['var_ema']),
                       ('exp_avg', {i: s['exp_avg'] for i, s in opt_a.items()}, {i: s['exp_avg'] for i, s in opt_b.items()})]:
        if rel == 0:
            diff = [k for k in a if not torch.equal(a[k], b[k])]
            assert not diff, f'{name} differ: {diff[:5]}'
        else:
            assert max_rel_diff(a, b) <= rel, name


@pytest.fixture(scope='module')
def fsdp_runs(tiny_shapes, tiny_vae_ckpt, tmp_path_factory):
    """An uninterrupted 2-process --fsdp=1 run, and one that kills itself (SIGKILL, every process) right after its checkpoint
    at micro step 8 (epoch 1, iteration 2), with a copy of that checkpoint taken before anything resumes from it."""
    root = tmp_path_factory.mktemp('fsdp')
    train(tiny_shapes, tiny_vae_ckpt, root / 'whole', 2, *FLAGS, '--fsdp=1')   # with the sample grid and save_pretrained
    res = train(tiny_shapes, tiny_vae_ckpt, root / 'killed', 2, *FLAGS, *QUIET, '--fsdp=1', env=script_env(VAR_TEST_SIGKILL_AT_ITER=8),
                check=False)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    shutil.copytree(root / 'killed', root / 'at_kill')
    return root


def test_fsdp_equals_ddp_in_float32(fsdp_runs, tiny_shapes, tiny_vae_ckpt):
    """Gradient accumulation, EMA, clipping: the same weights as DDP (FSDP2 averages the gradients itself, once)."""
    train(tiny_shapes, tiny_vae_ckpt, fsdp_runs / 'ddp', 2, *FLAGS, *QUIET)
    ck_ddp = torch.load(fsdp_runs / 'ddp' / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    assert_same_state(consolidated(fsdp_runs / 'whole' / 'ar-ckpt-last.dcp'), ck_ddp, rel=1e-5)


@pytest.mark.parametrize('fp16', [2, pytest.param(1, marks=pytest.mark.benchmark)])   # fp16: the long variant, `pytest -m benchmark`
def test_fsdp_equals_ddp_in_mixed_precision(tiny_shapes, tiny_vae_ckpt, tmp_path, fp16):
    """bfloat16 autocast with activation checkpointing; float16 with the loss scaler on sharded gradients (same scale after)."""
    flags = ['--bs=8', '--ep=1', '--tblr=3e-3', '--seed=3', f'--fp16={fp16}', '--grad_ckpt=1', *QUIET]
    train(tiny_shapes, tiny_vae_ckpt, tmp_path / 'ddp', 2, *flags)
    train(tiny_shapes, tiny_vae_ckpt, tmp_path / 'fsdp', 2, *flags, '--fsdp=1')
    ck_ddp = torch.load(tmp_path / 'ddp' / 'ar-ckpt-last.pth', map_location='cpu', weights_only=True)
    ck_fsdp = consolidated(tmp_path / 'fsdp' / 'ar-ckpt-last.dcp')
    assert max_rel_diff(ck_fsdp['trainer']['var_wo_ddp'], ck_ddp['trainer']['var_wo_ddp']) <= 1e-5
    if fp16 == 1:
        assert ck_fsdp['trainer']['var_opt']['scaler'] == ck_ddp['trainer']['var_opt']['scaler']


def test_sigkill_and_restart_give_the_same_weights_bitwise(fsdp_runs, tiny_shapes, tiny_vae_ckpt):
    out = fsdp_runs / 'killed'
    assert not any(p.name.startswith('ar-ckpt-last.dcp.') for p in out.iterdir())   # the kill came after the rename
    torn = out / f'ar-ckpt-last.dcp.tmp-{socket.gethostname()}-999999999'   # as a kill in the middle of a write leaves it
    torn.mkdir()
    (torn / '__0_0.distcp').write_bytes(b'partial')
    res = train(tiny_shapes, tiny_vae_ckpt, out, 2, *FLAGS, *QUIET, '--fsdp=1')
    assert 'ar-ckpt-last.dcp at epoch 1, iteration 2' in res.stdout
    assert not torn.exists() and 'removed 1 temporary checkpoint folders' in res.stdout
    assert_same_state(consolidated(out / 'ar-ckpt-last.dcp'), consolidated(fsdp_runs / 'whole' / 'ar-ckpt-last.dcp'))
    # the uninterrupted run also sampled (a collective with shards) and wrote its final model
    from models import load_pretrained
    _, var = load_pretrained(str(fsdp_runs / 'whole' / 'pretrained'))
    whole = consolidated(fsdp_runs / 'whole' / 'ar-ckpt-last.dcp')
    ema = whole['trainer']['var_ema']
    assert all(torch.equal(v, ema[k]) for k, v in var.state_dict().items() if k in ema)
    # the class folders' names (id = position): in the folder's meta.pth, through a resume, and beside the final model
    names = sorted(p.name for p in (tiny_shapes / 'train').iterdir())
    assert whole['class_names'] == consolidated(out / 'ar-ckpt-last.dcp')['class_names'] == var.class_names == names


def test_checkpoints_reshard_from_two_processes_to_one_and_back(fsdp_runs, tiny_shapes, tiny_vae_ckpt, tmp_path):
    """2 → 1, bitwise: one process resuming from the 2-process DCP folder (resharded by DCP) and one resuming from the same
    checkpoint consolidated to a single file (no sharding anywhere) continue to identical weights. 1 → 2, to rounding: that
    1-process folder (whole tensors) resumed by 2 sharded processes against the single file resumed by DDP (reduce-scatter
    against all-reduce; equal here, but not promised bit for bit). A 1-process continuation cannot equal the 2-process one:
    each process draws its own condition dropout, and the per-process sums round differently."""
    sharded, single = tmp_path / 'sharded', tmp_path / 'single'
    shutil.copytree(fsdp_runs / 'at_kill', sharded)
    single.mkdir()
    ck = consolidated(fsdp_runs / 'at_kill' / 'ar-ckpt-last.dcp', single / 'ar-ckpt-last.pth')
    # the consolidated export: the layout train.py writes without --fsdp, strictly loadable into build_vae_var's models
    from models import build_vae_var
    vae, var = build_vae_var(device='cpu', V=64, Cvae=8, ch=32, patch_nums=(1, 2, 3, 4), num_classes=6, depth=2)
    vae.load_state_dict(ck['trainer']['vae_local'], strict=True)
    var.load_state_dict(ck['trainer']['var_wo_ddp'], strict=True)
    var.load_state_dict(ck['trainer']['var_ema'], strict=True)
    assert ck['args']['world_size'] == 2 and (ck['epoch'], ck['iter']) == (1, 2)

    res = train(tiny_shapes, tiny_vae_ckpt, sharded, 1, *FLAGS, *QUIET, '--fsdp=1')
    assert 'resuming with 1 processes (the checkpoint was written with 2)' in res.stdout
    train(tiny_shapes, tiny_vae_ckpt, single, 1, *FLAGS, *QUIET)
    assert_same_state(consolidated(sharded / 'ar-ckpt-last.dcp'), torch.load(single / 'ar-ckpt-last.pth', weights_only=True))

    more = [f for f in FLAGS if f != '--ep=2'] + ['--ep=3']
    res = train(tiny_shapes, tiny_vae_ckpt, sharded, 2, *more, *QUIET, '--fsdp=1')
    assert 'resuming with 2 processes (the checkpoint was written with 1)' in res.stdout
    train(tiny_shapes, tiny_vae_ckpt, single, 2, *more, *QUIET)
    assert_same_state(consolidated(sharded / 'ar-ckpt-last.dcp'), torch.load(single / 'ar-ckpt-last.pth', weights_only=True), rel=1e-5)


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_damaged_shard_is_detected(fsdp_runs, tmp_path, damage):
    """Each shard file's sha256 in the manifest (written last) is checked: a truncated or flipped file names itself."""
    from utils.dcp_ckpt import ShardedStore
    folder = tmp_path / 'ck.dcp'
    shutil.copytree(fsdp_runs / 'whole' / 'ar-ckpt-last.dcp', folder)
    assert ShardedStore().verify(str(folder)) is None
    shard = folder / '__1_0.distcp'
    data = bytearray(shard.read_bytes())
    if damage == 'truncate':
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    problem = ShardedStore().verify(str(folder))
    assert problem is not None and '__1_0.distcp' in problem
    (folder / 'manifest.json').unlink()   # a folder whose writing was cut short
    assert 'not finished' in ShardedStore().verify(str(folder))


def test_damaged_shard_falls_back_to_the_previous_checkpoint(fsdp_runs, tiny_shapes, tiny_vae_ckpt, tmp_path):
    out = tmp_path / 'run'
    shutil.copytree(fsdp_runs / 'at_kill', out)
    shard = out / 'ar-ckpt-last.dcp' / '__0_0.distcp'
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    res = train(tiny_shapes, tiny_vae_ckpt, out, 2, *FLAGS, *QUIET, '--fsdp=1', '--ep=1')   # resumes, then has nothing left to do
    assert 'ar-ckpt-last.dcp is damaged' in res.stdout + res.stderr and 'sha256 of __0_0.distcp' in res.stdout + res.stderr
    assert 'ar-ckpt-prev.dcp at epoch 1, iteration 0' in res.stdout
    assert (out / 'ar-ckpt-last.dcp.damaged').is_dir()


def test_flags_fsdp_does_not_support_and_a_folder_of_the_other_kind(fsdp_runs, tiny_shapes, tiny_vae_ckpt):
    res = train(tiny_shapes, tiny_vae_ckpt, fsdp_runs / 'err', 1, '--fsdp=1', '--tfast=1', check=False)
    assert res.returncode == 1 and 'error: --fsdp=1 does not support --tfast=1: use --tfast=0' in res.stderr
    assert 'Traceback' not in res.stderr
    res = train(tiny_shapes, tiny_vae_ckpt, fsdp_runs / 'whole', 1, *FLAGS, check=False)   # DDP on an --fsdp=1 run's folder
    assert res.returncode == 1 and 'holds the sharded checkpoints of a --fsdp=1 run' in res.stderr


def test_train_vae_fsdp_runs_and_resumes(tiny_shapes, tmp_path):
    out = tmp_path / 'vae'
    flags = ['train_vae.py', f'--data_path={tiny_shapes}', f'--local_out_dir_path={out}', '--vocab_size=64', '--z_channels=8',
             '--vae_ch=32', '--pn=1_2_3_4', '--bs=8', '--lpips_weight=0', '--disc_start=-1', '--seed=2', '--fsdp=1']
    run_procs(flags + ['--ep=1'], 2)
    ck1 = consolidated(out / 'vae-ckpt-last.dcp')
    res = run_procs(flags + ['--ep=2'], 2)
    assert 'vae-ckpt-last.dcp at epoch 1, iteration 0' in res.stdout
    ck2 = consolidated(out / 'vae-ckpt-last.dcp')
    assert ck2['epoch'] == 2 and ck2['args']['world_size'] == 2
    from models import VQVAE
    from models.weights import load_weights
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4), test_mode=True)
    vae.load_state_dict(ck2['trainer']['vae_wo_ddp'], strict=True)
    exported = load_weights(str(out / 'vae.safetensors'))   # gathered from the shards for train.py --vae_ckpt
    assert all(torch.equal(exported[k], v) for k, v in ck2['trainer']['vae_wo_ddp'].items())
    assert any(not torch.equal(ck1['trainer']['vae_wo_ddp'][k], v) for k, v in ck2['trainer']['vae_wo_ddp'].items())
