"""sample.py: the same files for any number of processes and batch size, resume after SIGKILL, the npz; create_npz_from_sample_folder."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny, run_and_kill_after_checkpoint, run_script, script_env
from utils.misc import SampleFolderError, create_npz_from_sample_folder

MODEL_FLAGS = ['--depth=2', '--pn=1_2_3_4', '--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--num_classes=5']


@pytest.fixture(scope='module')
def tiny_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp('ckpt')
    vae, var = build_tiny(seed=21)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    return d


def sample_flags(ckpts, out, *extra):
    return ['sample.py', f'--var_ckpt={ckpts / "var.pth"}', f'--vae_ckpt={ckpts / "vae.pth"}', *MODEL_FLAGS, f'--out={out}',
            '--top_k=20', '--top_p=0.9', *extra]


def test_same_files_for_one_or_two_processes_and_any_batch_size(tiny_ckpts, tmp_path):
    one, two = tmp_path / 'one', tmp_path / 'two'
    run_script(sample_flags(tiny_ckpts, one, '--per_class=3', '--bs=4', '--seed=1'))
    res = run_script(sample_flags(tiny_ckpts, two, '--per_class=3', '--bs=3', '--seed=1'), torchrun_procs=2)
    assert 'rank 0 of 2' in res.stdout
    names = sorted(os.listdir(one))
    assert names == [f'{i:06d}.png' for i in range(15)] and sorted(os.listdir(two)) == names
    for n in names:
        assert (one / n).read_bytes() == (two / n).read_bytes(), n
    a = np.load(str(one) + '.npz')['arr_0']
    b = np.load(str(two) + '.npz')['arr_0']
    assert a.shape == (15, 64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.array_equal(a[7], np.asarray(Image.open(one / '000007.png')))
    # another seed, other images; the same seed again, the same images (the npz is reused)
    run_script(sample_flags(tiny_ckpts, tmp_path / 'other', '--per_class=3', '--bs=4', '--seed=2'))
    assert not np.array_equal(np.load(str(tmp_path / 'other') + '.npz')['arr_0'], a)
    assert 'holds all 15 images already' in run_script(sample_flags(tiny_ckpts, one, '--per_class=3', '--bs=4', '--seed=1')).stdout


def test_a_killed_run_resumes_to_exactly_n_images(tiny_ckpts, tmp_path):
    flags = ['--per_class=40', '--bs=2', '--seed=3', '--cfg=2']
    ref = tmp_path / 'ref'
    run_script(sample_flags(tiny_ckpts, ref, *flags))
    out = tmp_path / 'killed'
    run_and_kill_after_checkpoint(sample_flags(tiny_ckpts, out, *flags), out / '000010.png', delay=0.2)
    made = len(os.listdir(out))
    assert 0 < made < 200 and not (tmp_path / 'killed.npz').exists(), 'the kill must land mid-run'
    run_script(sample_flags(tiny_ckpts, out, *flags))
    files = sorted(os.listdir(out))
    assert files == [f'{i:06d}.png' for i in range(200)], 'exactly N images, no temporary files'
    assert np.array_equal(np.load(str(out) + '.npz')['arr_0'], np.load(str(ref) + '.npz')['arr_0'])


def test_trainer_checkpoint_and_its_ema_weights(tiny_ckpts, tmp_path):
    vae, var = build_tiny(seed=21)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and 'attn_bias' not in k else v for k, v in var.state_dict().items()}
    args = dict(patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=32, share_quant_resi=4, num_classes=5, depth=2, saln=False, anorm=True)
    ck = {'epoch': 3, 'iter': 0, 'args': args, 'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict(), 'var_ema': ema}}
    torch.save(ck, tmp_path / 'ar-ckpt-last.pth')
    common = [f'--var_ckpt={tmp_path / "ar-ckpt-last.pth"}', '--per_class=2', '--num_classes=5', '--top_k=20']
    run_script(['sample.py', *common, f'--out={tmp_path / "plain"}'])
    res = run_script(['sample.py', *common, '--ema=1', f'--out={tmp_path / "ema"}'])
    assert 'EMA weights, epoch 3' in res.stdout
    plain, with_ema = np.load(str(tmp_path / 'plain') + '.npz')['arr_0'], np.load(str(tmp_path / 'ema') + '.npz')['arr_0']
    assert plain.shape == with_ema.shape == (10, 64, 64, 3) and not np.array_equal(plain, with_ema)
    del ck['trainer']['var_ema']
    torch.save(ck, tmp_path / 'no_ema.pth')
    res = run_script(['sample.py', f'--var_ckpt={tmp_path / "no_ema.pth"}', '--ema=1', f'--out={tmp_path / "x"}'], check=False)
    assert res.returncode == 1 and 'has no EMA weights' in res.stderr


def test_published_checkpoint_offline_error(tmp_path):
    res = run_script([str(__import__('conftest').REPO / 'sample.py'), '--depth=20', f'--out={tmp_path / "s"}'], check=False,
                     env=script_env(HF_HOME=tmp_path / 'hf'), cwd=tmp_path)
    assert res.returncode == 1
    assert 'var_d20.pth is not at var_d20.pth and could not be downloaded from the Hugging Face repo FoundationVision/var' in res.stderr


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
    assert np.load(create_npz_from_sample_folder(str(f), n=5))['arr_0'].shape[0] == 5
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
