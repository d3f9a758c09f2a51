"""sample.py: the same files for any number of processes and batch size, resume after SIGKILL, the npz; create_npz_from_sample_folder."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny, reference_file, run_and_kill_after_checkpoint, run_script, script_env
from utils.misc import SampleFolderError, create_npz_from_sample_folder, read_npz_manifest

MODEL_FLAGS = ['--depth=2', '--pn=1_2_3_4', '--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--num_classes=5']
PNGS = [f'{i:06d}.png' for i in range(15)]


@pytest.fixture(scope='module')
def tiny_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    vae, var = build_tiny(fast=True, seed=21)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    return d


def sample_flags(ckpts, out, *extra):
    return ['sample.py', f'--var_ckpt={ckpts / "var.pth"}', f'--vae_ckpt={ckpts / "vae.pth"}', *MODEL_FLAGS, f'--out={out}',
            '--top_k=20', '--top_p=0.9', *extra]


@pytest.fixture(scope='module')
def ref_set(tiny_ckpts, tmp_path_factory):
    """A finished set of 15 images (3 per class, seed 1), PNGs and npz."""
    out = tmp_path_factory.mktemp('ref') / 'set'
    run_script(sample_flags(tiny_ckpts, out, '--per_class=3', '--bs=4', '--seed=1'))
    return out


def pngs(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith('.png'))


def stats(folder):
    """(inode, mtime_ns) of every PNG: a rewritten file (atomic rename) gets a new inode."""
    return {n: (os.stat(folder / n).st_ino, os.stat(folder / n).st_mtime_ns) for n in pngs(folder)}


def copy_set(src, dst, npz=False):
    shutil.copytree(src, dst)
    if npz:
        shutil.copy(str(src) + '.npz', str(dst) + '.npz')
    return dst


def refused(res, *phrases):
    assert res.returncode != 0, res.stdout[-2000:]
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]
    for p in phrases:
        assert p in res.stderr, f'{p!r} not in:\n{res.stderr[-3000:]}'


def in_process(var, indices, per_class, seed, cfg=1.5, top_k=20, top_p=0.9):
    """Images `indices` (uint8 (B, H, W, 3)) sampled in this process from the documented rule, independently of sample.py:
    label i // per_class, generator seeded by (seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019) mod 2^63 - 1."""
    from utils.imgs import to_uint8_BHW3
    indices = list(indices)
    seeds = [(seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E019) % (2 ** 63 - 1) for i in indices]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the scripts run (OMP_NUM_THREADS=1)
    try:
        with torch.inference_mode():
            img = var.autoregressive_infer_cfg(B=len(indices), label_B=torch.tensor([i // per_class for i in indices]), g_seed=seeds,
                                               cfg=cfg, top_k=top_k, top_p=top_p)
    finally:
        torch.set_num_threads(threads)
    return to_uint8_BHW3(img)


def test_same_files_for_one_or_two_processes_and_any_batch_size(tiny_ckpts, ref_set, tmp_path):
    """Batch sizes 1, 2, 3 (two processes) and 4 give byte-identical PNGs; images 4 and 10 are what their index says."""
    runs = {4: ref_set}
    for bs in (1, 2):
        runs[bs] = tmp_path / f'bs{bs}'
        run_script(sample_flags(tiny_ckpts, runs[bs], '--per_class=3', f'--bs={bs}', '--seed=1'))
    runs[3] = tmp_path / 'two'
    res = run_script(sample_flags(tiny_ckpts, runs[3], '--per_class=3', '--bs=3', '--seed=1'), torchrun_procs=2)
    assert 'rank 0 of 2' in res.stdout
    for bs, folder in runs.items():
        assert pngs(folder) == PNGS
        for n in PNGS:
            assert (folder / n).read_bytes() == (ref_set / n).read_bytes(), f'--bs={bs}: {n} differs from --bs=4'
    a = np.load(str(ref_set) + '.npz')['arr_0']
    assert a.shape == (15, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, np.load(str(runs[3]) + '.npz')['arr_0'])
    assert np.array_equal(a[7], np.asarray(Image.open(ref_set / '000007.png')))

    # images 4 and 10 made in-process from their index alone: label i // per_class (not i % num_classes), seeds of (--seed, i)
    _, var = build_tiny(fast=True, seed=21)
    from utils.imgs import save_png_atomic
    for i, arr in zip((4, 10), in_process(var, [4, 10], per_class=3, seed=1)):
        save_png_atomic(arr, str(tmp_path / 'in_process.png'))
        assert (tmp_path / 'in_process.png').read_bytes() == (ref_set / f'{i:06d}.png').read_bytes(), i

    # the same settings again reuse the npz; two processes refuse other settings together
    assert 'holds all 15 images already' in run_script(sample_flags(tiny_ckpts, ref_set, '--per_class=3', '--bs=2', '--seed=1')).stdout
    res = run_script(sample_flags(tiny_ckpts, runs[3], '--per_class=3', '--bs=3', '--seed=1', '--cfg=2'), torchrun_procs=2,
                     check=False, timeout=120)
    assert res.returncode != 0 and '--cfg: 1.5 then, 2.0 now' in res.stderr


def test_a_killed_run_resumes_to_exactly_n_images_without_rewriting_finished_ones(tiny_ckpts, tmp_path):
    flags = ['--per_class=40', '--bs=2', '--seed=3', '--cfg=2']
    ref = tmp_path / 'ref'
    run_script(sample_flags(tiny_ckpts, ref, *flags))
    out = tmp_path / 'killed'
    run_and_kill_after_checkpoint(sample_flags(tiny_ckpts, out, *flags), out / '000010.png', kill_at_iter=12)
    before = stats(out)
    assert pngs(out) == [f'{i:06d}.png' for i in range(12)] and not (tmp_path / 'killed.npz').exists(), \
        'the kill lands after the 12th image (VAR_TEST_SIGKILL_AT_ITER)'
    run_script(sample_flags(tiny_ckpts, out, *flags))
    assert pngs(out) == [f'{i:06d}.png' for i in range(200)] and sorted(os.listdir(out)) == pngs(out) + ['manifest.json'], \
        'exactly N images and the manifest, no temporary files'
    after = stats(out)
    assert {n: after[n] for n in before} == before, 'the images finished before the kill were not written again'
    assert np.array_equal(np.load(str(out) + '.npz')['arr_0'], np.load(str(ref) + '.npz')['arr_0'])


def test_damaged_pngs_are_made_again(tiny_ckpts, ref_set, tmp_path):
    out = copy_set(ref_set, tmp_path / 'set')
    (out / '000003.png').write_bytes(b'')                                               # zero length
    (out / '000005.png').write_bytes((ref_set / '000005.png').read_bytes()[:200])       # truncated
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(out / '000008.png')           # another size
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(out / '000009.png')              # not RGB
    damaged = ['000003.png', '000005.png', '000008.png', '000009.png']
    before = stats(out)
    res = run_script(sample_flags(tiny_ckpts, out, '--per_class=3', '--bs=4', '--seed=1'))
    for n in damaged:
        assert f'{n} is damaged' in res.stdout + res.stderr
    for n in PNGS:
        assert (out / n).read_bytes() == (ref_set / n).read_bytes(), n
    after = stats(out)
    assert all(after[n] == before[n] for n in PNGS if n not in damaged)
    assert np.array_equal(np.load(str(out) + '.npz')['arr_0'], np.load(str(ref_set) + '.npz')['arr_0'])


def test_the_manifest_is_in_the_folder_and_the_npz_and_evaluate_prints_it(tiny_ckpts, ref_set, capsys):
    from evaluate import print_sample_manifest
    from utils.model_loading import state_fingerprint
    folder = json.loads((ref_set / 'manifest.json').read_text())
    assert read_npz_manifest(str(ref_set) + '.npz') == folder
    with np.load(str(ref_set) + '.npz') as z:
        assert z['arr_0'].shape == (15, 64, 64, 3)   # what the OpenAI evaluator reads is unchanged
    p = folder['pixels']
    assert (p['cfg'], p['top_k'], p['top_p'], p['seed'], p['per_class'], p['num_classes'], p['fp16'], p['more_smooth']) == \
        (1.5, 20, 0.9, 1, 3, 5, 0, False)
    assert p['model']['depth'] == 2 and p['model']['patch_nums'] == [1, 2, 3, 4] and p['image_size'] == 64
    vae, var = build_tiny(fast=True, seed=21)
    assert p['var_sha256'] == state_fingerprint(var) and p['vae_sha256'] == state_fingerprint(vae)
    with torch.no_grad():
        var.head.bias[0] += 1e-6
    assert state_fingerprint(var) != p['var_sha256']
    print_sample_manifest(str(ref_set) + '.npz')
    assert p['var_sha256'] in capsys.readouterr().out


def test_a_rerun_with_other_settings_or_weights_is_refused(tiny_ckpts, ref_set, tmp_path):
    out = copy_set(ref_set, tmp_path / 'set', npz=True)
    before = stats(out)
    res = run_script(sample_flags(tiny_ckpts, out, '--per_class=2', '--bs=4', '--seed=5', '--cfg=2', '--top_k=10', '--top_p=0.5',
                                  '--more_smooth=1', '--fp16=2'), check=False)
    refused(res, '--per_class: 3 then, 2 now', '--seed: 1 then, 5 now', '--cfg: 1.5 then, 2.0 now', '--top_k: 20 then, 10 now',
            '--top_p: 0.9 then, 0.5 now', '--more_smooth: False then, True now', '--fp16: 0 then, 2 now',
            'start afresh with another --out')
    assert 'VAR d2 from' not in res.stdout, 'refused before the model is built'
    vae, var = build_tiny(fast=True, seed=22)   # the same architecture, other weights
    torch.save(var.state_dict(), tmp_path / 'var_other.pth')
    torch.save(vae.state_dict(), tmp_path / 'vae_other.pth')
    flags = sample_flags(tiny_ckpts, out, '--per_class=3', '--bs=4', '--seed=1')
    res = run_script([f.replace(str(tiny_ckpts / 'var.pth'), str(tmp_path / 'var_other.pth')) for f in flags], check=False)
    refused(res, 'VAR weights (sha256 of the state dict)')
    assert 'tokenizer weights' not in res.stderr
    res = run_script([f.replace(str(tiny_ckpts / 'vae.pth'), str(tmp_path / 'vae_other.pth')) for f in flags], check=False)
    refused(res, 'tokenizer weights (sha256 of the state dict)')
    assert stats(out) == before and np.array_equal(np.load(str(out) + '.npz')['arr_0'], np.load(str(ref_set) + '.npz')['arr_0'])
    # the npz alone (the folder deleted to save space) is checked the same way
    shutil.rmtree(out)
    refused(run_script(sample_flags(tiny_ckpts, out, '--per_class=3', '--bs=4', '--seed=2'), check=False),
            f'{out}.npz was made with other settings', '--seed: 1 then, 2 now')


def test_the_batch_size_is_a_pixel_setting_on_cuda_only():
    """cuBLAS and cuDNN choose kernels by the batch's shape, so on CUDA another --bs may move pixels by a level (seen on the
    GPU check: a few hundred values of each image, by one level): it is compared on a rerun there. On the CPU the PNGs are
    byte-identical for any --bs (test_same_files_for_one_or_two_processes_and_any_batch_size), so it is not."""
    from sample import SampleArgs, manifest_differences, sampling_settings
    args = SampleArgs(bs=4)
    assert 'bs' not in sampling_settings(args, torch.device('cpu'))
    on_cuda = sampling_settings(args, torch.device('cuda'))
    assert on_cuda['bs'] == 4 and on_cuda['tf32'] == args.tf32
    args.bs = 7
    assert manifest_differences({'pixels': on_cuda}, sampling_settings(args, torch.device('cuda'))) == ['--bs: 4 then, 7 now']
    assert manifest_differences({'pixels': sampling_settings(SampleArgs(bs=4), torch.device('cpu'))},
                                sampling_settings(args, torch.device('cpu'))) == []


def test_foreign_files_in_out_are_refused(tiny_ckpts, ref_set, tmp_path):
    flags = ['--per_class=3', '--bs=4', '--seed=1']
    extra = copy_set(ref_set, tmp_path / 'extra')
    shutil.copy(extra / '000001.png', extra / '000015.png')
    refused(run_script(sample_flags(tiny_ckpts, extra, *flags), check=False), 'holds images beyond the 15 asked for (from index 15)')
    old = copy_set(ref_set, tmp_path / 'old')
    (old / 'manifest.json').unlink()
    refused(run_script(sample_flags(tiny_ckpts, old, *flags), check=False), 'holds images but no manifest.json')
    bare = copy_set(ref_set, tmp_path / 'bare')
    create_npz_from_sample_folder(str(bare), n=15)   # the same images, no manifest
    shutil.rmtree(bare)
    refused(run_script(sample_flags(tiny_ckpts, bare, *flags), check=False), 'bare.npz exists but carries no manifest')


def test_trainer_checkpoint_its_ema_weights_and_its_model_flags(tiny_ckpts, tmp_path):
    vae, var = build_tiny(fast=True, seed=21)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and 'attn_bias' not in k else v for k, v in var.state_dict().items()}
    args = dict(patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=32, share_quant_resi=4, num_classes=5, depth=2, saln=False, anorm=True)
    ck = {'epoch': 3, 'iter': 0, 'args': args, 'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict(), 'var_ema': ema}}
    torch.save(ck, tmp_path / 'ar-ckpt-last.pth')
    torch.save(ema, tmp_path / 'ema_plain.pth')
    common = [f'--var_ckpt={tmp_path / "ar-ckpt-last.pth"}', '--per_class=2', '--num_classes=5', '--top_k=20']
    run_script(['sample.py', *common, f'--out={tmp_path / "plain"}'])
    res = run_script(['sample.py', *common, '--ema=1', f'--out={tmp_path / "ema"}'])
    assert 'EMA weights, epoch 3' in res.stdout
    # the EMA weights saved as a plain state dict give the same bytes
    run_script(['sample.py', f'--var_ckpt={tmp_path / "ema_plain.pth"}', f'--vae_ckpt={tiny_ckpts / "vae.pth"}', *MODEL_FLAGS,
                '--per_class=2', '--top_k=20', f'--out={tmp_path / "ema_plain"}'])
    load = lambda name: np.load(str(tmp_path / name) + '.npz')['arr_0']  # noqa: E731
    plain, with_ema = load('plain'), load('ema')
    assert plain.shape == with_ema.shape == (10, 64, 64, 3) and not np.array_equal(plain, with_ema)
    assert np.array_equal(with_ema, load('ema_plain'))
    for n in (f'{i:06d}.png' for i in range(10)):
        assert (tmp_path / 'ema' / n).read_bytes() == (tmp_path / 'ema_plain' / n).read_bytes()

    # model flags that disagree with the checkpoint's args stop before anything is sampled
    res = run_script(['sample.py', *common, '--depth=3', '--pn=1_2_3', f'--out={tmp_path / "y"}'], check=False)
    refused(res, 'train.py checkpoint whose args define the model', '--depth=3 (the checkpoint: 2)', '--pn=1_2_3 (the checkpoint: 1_2_3_4)')
    assert not (tmp_path / 'y').exists()
    del ck['trainer']['var_ema']
    torch.save(ck, tmp_path / 'no_ema.pth')
    res = run_script(['sample.py', f'--var_ckpt={tmp_path / "no_ema.pth"}', '--ema=1', f'--out={tmp_path / "x"}'], check=False)
    refused(res, 'has no EMA weights')


def test_a_mismatched_checkpoint_is_a_clear_error(tiny_ckpts, tmp_path):
    res = run_script(sample_flags(tiny_ckpts, tmp_path / 's', '--depth=3'), check=False)   # a depth-2 state dict
    refused(res, 'missing keys', 'blocks.2.')
    assert not (tmp_path / 's').exists()


@pytest.mark.parametrize('flag, phrase', [
    ('--top_k=-1', '--top_k=-1 must be 0'), ('--top_p=1.5', '--top_p=1.5 must be in (0, 1]'), ('--top_p=0', '--top_p=0.0 must be in (0, 1]'),
    ('--top_p=nan', '--top_p=nan'), ('--bs=0', '--bs=0 must be an integer >= 1'), ('--per_class=0', '--per_class=0 must be'),
    ('--num_classes=-1', '--num_classes=-1 must be 0'), ('--fp16=3', '--fp16=3: use 0'), ('--cfg=inf', '--cfg=inf must be a finite'),
    ('--pn=3_2', '--pn='),
])
def test_bad_flags_are_named_before_any_file_is_read(tmp_path, flag, phrase):
    from sample import main, parse_sample_args
    from utils.arg_util import FlagError
    args = parse_sample_args([f'--var_ckpt={tmp_path / "absent.pth"}', f'--out={tmp_path / "s"}', flag])
    with pytest.raises(FlagError) as e:
        main(args)
    assert phrase in str(e.value)
    assert not (tmp_path / 's').exists()


def test_flags_beyond_the_model_are_named_before_it_is_built(tiny_ckpts, tmp_path):
    res = run_script(sample_flags(tiny_ckpts, tmp_path / 's', '--num_classes=6', '--top_k=65'), check=False)
    refused(res, '--num_classes=6 but the model knows 5 classes')
    res = run_script(sample_flags(tiny_ckpts, tmp_path / 's', '--top_k=65'), check=False)
    refused(res, '--top_k=65 exceeds the vocabulary size 64')
    assert 'VAR d2 from' not in res.stdout and not (tmp_path / 's').exists()


def test_fp16_and_bf16_autocast(tiny_ckpts, ref_set, tmp_path):
    """--fp16=1 samples under float16 autocast, --fp16=2 under bfloat16: the same bytes as in-process under that autocast."""
    ref = np.load(str(ref_set) + '.npz')['arr_0'][:6]   # images 0-5: classes 0 and 1, 3 each
    _, var = build_tiny(fast=True, seed=21)
    for mode, dtype in ((1, torch.float16), (2, torch.bfloat16)):
        out = tmp_path / f'fp16_{mode}'
        run_script(sample_flags(tiny_ckpts, out, '--per_class=3', '--num_classes=2', '--bs=6', '--seed=1', f'--fp16={mode}'))
        arr = np.load(str(out) + '.npz')['arr_0']
        assert read_npz_manifest(str(out) + '.npz')['pixels']['fp16'] == mode
        assert arr.shape == (6, 64, 64, 3) and not np.array_equal(arr, ref)
        with torch.autocast('cpu', dtype=dtype):
            want = in_process(var, range(6), per_class=3, seed=1)
        assert np.array_equal(arr, want), f'--fp16={mode} is not {dtype} autocast'


def test_published_checkpoint_offline_error_and_missing_local_paths(tiny_ckpts, tmp_path):
    res = run_script([str(__import__('conftest').REPO / 'sample.py'), '--depth=20', f'--out={tmp_path / "s"}'], check=False,
                     env=script_env(HF_HOME=tmp_path / 'hf'), cwd=tmp_path)
    assert res.returncode == 1
    assert 'var_d20.pth is not at var_d20.pth and could not be downloaded from the Hugging Face repo FoundationVision/var' in res.stderr
    # a path (with a folder) to a published name that is not there is a local file that is missing, not a download
    missing = tmp_path / 'ckpts' / 'vae_ch160v4096z32.pth'
    flags = [f.replace(str(tiny_ckpts / 'vae.pth'), str(missing)) for f in sample_flags(tiny_ckpts, tmp_path / 's')]
    res = run_script(flags, check=False)
    refused(res, f'{missing} does not exist; to download the published vae_ch160v4096z32.pth, give its bare name')
    assert 'could not be downloaded' not in res.stderr
    res = run_script(['sample.py', f'--var_ckpt={tmp_path / "var_d16.pth"}', f'--out={tmp_path / "s"}'], check=False)
    refused(res, f'--var_ckpt={tmp_path / "var_d16.pth"}: no such file; for the published var_d16.pth leave --var_ckpt empty')


def write_pngs(folder, idx, size=(8, 8)):
    folder.mkdir(exist_ok=True)
    for i in idx:
        Image.fromarray(np.full((size[1], size[0], 3), i, dtype=np.uint8)).save(folder / f'{i:06d}.png')


def test_create_npz_from_sample_folder(tmp_path):
    f = tmp_path / 'samples'
    write_pngs(f, range(5))
    path = create_npz_from_sample_folder(str(f))
    arr = np.load(path)['arr_0']
    assert path == str(f) + '.npz' and arr.shape == (5, 8, 8, 3) and arr.dtype == np.uint8
    assert [int(a[0, 0, 0]) for a in arr] == [0, 1, 2, 3, 4]
    assert read_npz_manifest(path) is None
    assert read_npz_manifest(create_npz_from_sample_folder(str(f), n=5, manifest={'a': [1, 2]})) == {'a': [1, 2]}
    assert np.load(path)['arr_0'].shape[0] == 5
    with pytest.raises(SampleFolderError, match=r'1 of the 6 images are missing \(indices 5\)'):
        create_npz_from_sample_folder(str(f), n=6)
    with pytest.raises(SampleFolderError, match=r'2 images beyond the expected 3 \(indices 3, 4\)'):
        create_npz_from_sample_folder(str(f), n=3)
    (f / '000002.png').unlink()
    with pytest.raises(SampleFolderError, match=r'missing \(indices 2\)'):
        create_npz_from_sample_folder(str(f), n=5)
    write_pngs(f, [2], size=(9, 8))
    with pytest.raises(SampleFolderError, match=r'000002.png is 9x8, the others 8x8'):
        create_npz_from_sample_folder(str(f))
    with pytest.raises(SampleFolderError, match='does not exist'):
        create_npz_from_sample_folder(str(tmp_path / 'nothing'))
    assert not any(p.name.startswith('samples.npz.tmp') for p in tmp_path.iterdir())


def test_a_checkpoint_of_the_reference_trainer_samples_with_its_shape_inferred(tmp_path):
    """The reference's train.py records neither the class count nor the tokenizer shape: both come from the weights."""
    ckpt = reference_file('ckpt_reference_tiny.pth')
    build = json.loads(reference_file('ckpt_reference_tiny.json').read_text())['build']
    out = tmp_path / 'ref'
    res = run_script(['sample.py', f'--var_ckpt={ckpt}', '--per_class=1', '--num_classes=2', '--bs=2', '--top_k=100', f'--out={out}'])
    assert 'a checkpoint of the reference trainer; inferred' in res.stdout + res.stderr
    assert json.loads((out / 'manifest.json').read_text())['pixels']['model'] == build
    assert sorted(p.name for p in out.glob('*.png')) == ['000000.png', '000001.png']


def test_temporary_files_of_a_killed_run_are_removed_and_nothing_else(ref_set, tiny_ckpts, tmp_path):
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    out = copy_set(ref_set, tmp_path / 'set')
    stale = [out / f'000003.png.tmp-{host}-{dead}', out / f'manifest.json.tmp-{host}-{dead}', tmp_path / f'set.npz.tmp-{host}-{dead}']
    kept = [tmp_path / f'other.npz.tmp-{host}-{dead}', out / 'notes.txt.tmp-x-1']   # not this run's files
    for p in stale + kept:
        p.write_bytes(b'partial')
    res = run_script(sample_flags(tiny_ckpts, out, '--per_class=3', '--bs=4', '--seed=1'))
    assert 'removed 3 temporary file(s) of a killed run' in res.stdout + res.stderr
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert (tmp_path / 'set.npz').is_file()
