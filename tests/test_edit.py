"""edit.py: in-paint, out-paint and class edits keep exactly the tokenizer's reconstruction outside what they redraw."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny, run_script


@pytest.fixture(scope='module')
def setup(tmp_path_factory, shapes_data):
    d = tmp_path_factory.mktemp('edit')
    vae, var = build_tiny(seed=5)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    image = next((shapes_data / 'train').glob('*/00003.png'))
    return d, image


def edit(d, image, out, *extra, check=True):
    return run_script(['edit.py', f'--image={image}', f'--var_ckpt={d / "var.pth"}', f'--vae_ckpt={d / "vae.pth"}', '--depth=2',
                       '--pn=1_2_3_4', '--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--num_classes=5', '--top_k=20',
                       f'--out={out}', '--save_recon=1', *extra], check=check)


def keep_px(keep_hw, size=64):
    return np.kron(keep_hw, np.ones((size // keep_hw.shape[0],) * 2, dtype=bool))


@pytest.mark.parametrize('mode, box, keep', [
    ('inpaint', '0.25,0.25,0.75,0.75', [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]),
    ('outpaint', '0.25,0.25,0.75,0.75', [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]),
    ('class', '0,0,0.5,1', [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
])
def test_edit_keeps_the_reconstruction_where_it_must(setup, tmp_path, mode, box, keep):
    d, image = setup
    out = tmp_path / 'out.png'
    extra = ['--class_id=3'] if mode == 'class' else []
    edit(d, image, out, f'--mode={mode}', f'--box={box}', *extra)
    res = np.asarray(Image.open(out)).astype(int)
    recon = np.asarray(Image.open(tmp_path / 'out_recon.png')).astype(int)
    kp = keep_px(np.array(keep, dtype=bool))
    assert res.shape == recon.shape == (64, 64, 3)
    assert np.array_equal(res[kp], recon[kp]), 'kept cells must equal the reconstruction'
    assert np.abs(res[~kp] - recon[~kp]).mean() > 1, 'the edited cells are generated anew'


def test_mask_image_and_several_versions(setup, tmp_path):
    d, image = setup
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255                      # the right half is the region
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    edit(d, image, tmp_path / 'e.png', '--mode=inpaint', f'--mask={tmp_path / "mask.png"}', '--n=2')
    a, b = (np.asarray(Image.open(tmp_path / f'e_{k}.png')).astype(int) for k in (0, 1))
    recon = np.asarray(Image.open(tmp_path / 'e_recon.png')).astype(int)
    assert np.array_equal(a[:, :32], recon[:, :32]) and np.array_equal(b[:, :32], recon[:, :32])
    assert not np.array_equal(a[:, 32:], b[:, 32:]), 'two seeds, two versions'


def test_edit_flags_are_checked(setup, tmp_path):
    d, image = setup
    res = edit(d, image, tmp_path / 'x.png', '--mode=class', '--box=0,0,0.5,0.5', check=False)
    assert res.returncode == 1 and '--mode=class needs the target --class_id' in res.stderr
    res = edit(d, image, tmp_path / 'x.png', '--mode=inpaint', check=False)
    assert res.returncode == 1 and 'exactly one of --box=y0,x0,y1,x1 or --mask=PATH' in res.stderr
    res = edit(d, image, tmp_path / 'x.png', '--mode=inpaint', '--box=0.5,0,0.1,1', check=False)
    assert res.returncode == 1 and '0 <= y0 < y1 <= 1' in res.stderr
    res = edit(d, tmp_path / 'missing.png', tmp_path / 'x.png', '--box=0,0,0.5,0.5', check=False)
    assert res.returncode == 1 and 'cannot read the image' in res.stderr
