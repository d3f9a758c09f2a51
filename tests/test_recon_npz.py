"""train_vae.py --eval_only --recon_npz: the val set's reconstructions and originals as npz files for rFID, checked against
the tokenizer and the crop computed here, the same for one process and two, and the flag refused without --eval_only."""
import hashlib
import os

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import run_script
from test_train_vae import TINY_VAE_FLAGS, vae_flags
from utils.misc import read_npz_manifest


def val_files(data):
    """The val images in the val folder's order: class folders sorted, files sorted."""
    root = data / 'val'
    return [root / c / f for c in sorted(os.listdir(root)) for f in sorted(os.listdir(root / c))]


def centre_crops(data, side=64, mid_reso=1.125):
    """(N, side, side, 3) uint8: each val image's short side Lanczos-resized to round(mid_reso x side), then centre-cropped."""
    out = []
    for path in val_files(data):
        img = PIL.Image.open(path).convert('RGB')
        w, h = img.size
        short = round(mid_reso * side)
        img = img.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), PIL.Image.LANCZOS)
        left, top = round((img.size[0] - side) / 2), round((img.size[1] - side) / 2)
        out.append(np.asarray(img.crop((left, top, left + side, top + side))))
    return np.stack(out)


def reconstructions(vae_ckpt, imgs_NHW3):
    """The tiny tokenizer's reconstruction from all scales of each image (uint8, rounded to nearest)."""
    from models import VQVAE
    from utils.cpu_speed import speed_up
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4), test_mode=True)
    vae.load_state_dict(torch.load(vae_ckpt, map_location='cpu', weights_only=True), strict=True)
    vae.eval()
    speed_up(vae)   # as train_vae.py's
    x_B3HW = torch.from_numpy(imgs_NHW3).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    with torch.no_grad():
        rec_B3HW = vae.idxBl_to_img(vae.img_to_idxBl(x_B3HW), same_shape=True, last_one=True)
    return ((rec_B3HW + 1) / 2 * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), vae


def arr0_bytes(path):
    return np.load(path)['arr_0'].tobytes()


def test_recon_npz_holds_the_tokenizers_reconstructions_and_the_crops_for_any_process_count(tiny_shapes, tiny_vae_ckpt, tmp_path):
    # --bs=2: blocks of 3 images on one process; blocks of 2 on two, where rank 1 has one block fewer than rank 0
    eval_flags = ['--eval_only=1', f'--vae_ckpt={tiny_vae_ckpt}', '--bs=2']
    res = run_script(vae_flags(tiny_shapes, tmp_path / 'one', *eval_flags, f'--recon_npz={tmp_path / "one" / "rec.npz"}'))
    rec_path, ref_path = tmp_path / 'one' / 'rec.npz', tmp_path / 'one' / 'rec_ref.npz'
    assert f'python evaluate.py {ref_path} {rec_path}' in res.stdout
    rec, ref = np.load(rec_path)['arr_0'], np.load(ref_path)['arr_0']
    assert rec.shape == ref.shape == (6, 64, 64, 3) and rec.dtype == ref.dtype == np.uint8
    crops = centre_crops(tiny_shapes)
    assert np.array_equal(ref, crops)
    want, vae = reconstructions(tiny_vae_ckpt, crops)
    assert np.array_equal(rec, want)
    assert not np.array_equal(rec, ref)

    # the manifests say what the files are
    from utils.model_loading import state_fingerprint
    m_rec, m_ref = read_npz_manifest(rec_path)['pixels'], read_npz_manifest(ref_path)['pixels']
    names = '\n'.join(str(p.relative_to(tiny_shapes)) for p in val_files(tiny_shapes))
    for m in (m_rec, m_ref):
        assert m['data_path'] == str(tiny_shapes) and m['images'] == 6 and m['image_size'] == 64 and m['crop'] == 'centre'
        assert m['files_sha256'] == hashlib.sha256(names.encode()).hexdigest() and m['unreadable_replaced'] == 0
    assert m_rec['vae_sha256'] == state_fingerprint(vae) and 'vae_sha256' not in m_ref
    assert m_rec['model']['V'] == 64 and m_rec['content'] != m_ref['content']
    assert not [p.name for p in (tmp_path / 'one').iterdir() if '.tmp-' in p.name]

    # two processes (gloo), under DDP and with the weights sharded (FSDP2 gathers them in the forward passes, between the
    # files' gathers): the same images, and the same settings recorded
    for name, extra in (('ddp', []), ('fsdp', ['--fsdp=1', '--disc_start=-1', '--lpips_weight=0'])):
        out = tmp_path / name
        run_script(vae_flags(tiny_shapes, out, *eval_flags, *extra, f'--recon_npz={out / "rec.npz"}'), torchrun_procs=2, timeout=120)
        assert arr0_bytes(out / 'rec.npz') == arr0_bytes(rec_path), name
        assert arr0_bytes(out / 'rec_ref.npz') == arr0_bytes(ref_path), name
        assert read_npz_manifest(out / 'rec.npz')['pixels'] == m_rec and read_npz_manifest(out / 'rec.npz')['info']['processes'] == 2


@pytest.mark.parametrize('flags, expected', [
    (['--recon_npz=r.npz'], '--recon_npz=r.npz needs --eval_only=1'),
    (['--eval_only=1', '--recon_npz=r.png'], '--recon_npz=r.png must end in .npz'),
])
def test_recon_npz_flag_errors_come_before_any_work(tmp_path, flags, expected):
    from train_vae import main
    from utils.arg_util import FlagError, parse_vae_args
    out = tmp_path / 'out'
    with pytest.raises(FlagError, match=expected.replace('.', r'\.')):
        main(parse_vae_args([f'--data_path={tmp_path / "no_such_folder"}', f'--local_out_dir_path={out}', *TINY_VAE_FLAGS, *flags]))
    assert not out.exists()   # nothing was made: not the output folder, not the process group, not the data scan


def test_recon_npz_without_eval_only_is_one_error_line(tmp_path):
    res = run_script(vae_flags(tmp_path / 'data', tmp_path / 'out', f'--recon_npz={tmp_path / "r.npz"}'), check=False)
    assert res.returncode == 1 and 'Traceback' not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith('error: --recon_npz=') and '--eval_only=1' in res.stderr
