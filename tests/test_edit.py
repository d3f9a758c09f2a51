"""edit.py: the kept cells are the tokenizer's reconstruction of the input, the redrawn ones what the sampler draws
with the input's tokens kept at every scale, the mask marks the region the user drew, and bad input stops cleanly.

The expected results are computed here, in-process, from the same weights: the input image read with plain PIL,
its tokens and reconstruction, and `autoregressive_infer_cfg(..., edit_mask=...)` with a mask written out by hand.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny, run_script

MODEL_FLAGS = ['--depth=2', '--pn=1_2_3_4', '--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--num_classes=5']
SAMPLING = dict(cfg=3.0, top_k=20, top_p=0.95)
SAMPLING_FLAGS = [f'--{k}={v}' for k, v in SAMPLING.items()]


@pytest.fixture(scope='module')
def setup(tmp_path_factory, shapes_data):
    """(folder with the weights, a 64 px RGB input image, the tokenizer and VAR built as edit.py builds them)."""
    from edit import parse_edit_args
    from utils.cpu_speed import speed_up
    from utils.model_loading import load_for_sampling
    d = tmp_path_factory.mktemp('edit')
    vae, var = build_tiny(fast=True, seed=5)
    torch.save(vae.state_dict(), d / 'vae.pth')
    torch.save(var.state_dict(), d / 'var.pth')
    image = next((shapes_data / 'train').glob('*/00003.png'))
    vae, var, _ = load_for_sampling(torch.device('cpu'), parse_edit_args(weights(d) + MODEL_FLAGS))
    speed_up(vae, var)
    return d, image, vae, var


def weights(d):
    return [f'--var_ckpt={d / "var.pth"}', f'--vae_ckpt={d / "vae.pth"}']


def edit(d, image, out, *extra, check=True):
    return run_script(['edit.py', f'--image={image}', *weights(d), *MODEL_FLAGS, *SAMPLING_FLAGS, f'--out={out}', *extra], check=check)


def read(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(int)


def keep_px(keep_hw, size=64):
    return np.kron(keep_hw, np.ones((size // keep_hw.shape[0],) * 2, dtype=int)).astype(bool)


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    return np.floor(img_B3HW.clamp(0, 1).mul(255).add(0.5).permute(0, 2, 3, 1).numpy()).astype(int)


def surely_kept(keep_PP: np.ndarray, pn: int) -> np.ndarray:
    """(pn, pn): the cells of a pn x pn scale that lie wholly inside the kept cells of the last (P x P) scale."""
    P = keep_PP.shape[0]
    near = [[r for r in range(P) if r * pn < (i + 1) * P and (r + 1) * pn > i * P] for i in range(pn)]
    return np.array([[keep_PP[np.ix_(near[i], near[j])].all() for j in range(pn)] for i in range(pn)])


def expected_edit(vae, var, img_13HW, keep_PP, class_id, seeds):
    """Recon and generated images (uint8, B H W 3) computed in-process; asserts that the token map the sampler
    used at every scale holds the input's tokens wherever a cell lies inside the kept region."""
    quant = var.vae_quant_proxy[0]
    used = []
    original = quant.get_next_autoregressive_input

    def record(si, SN, f_hat, h_BChw):
        used.append(h_BChw.clone())
        return original(si, SN, f_hat, h_BChw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)                      # as in the edit.py process (OMP_NUM_THREADS=1)
    quant.get_next_autoregressive_input = record
    try:
        with torch.inference_mode():
            idx_Bl = vae.img_to_idxBl(img_13HW)
            recon = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).add(1).mul(0.5)
            gen = var.autoregressive_infer_cfg(B=len(seeds), label_B=class_id, g_seed=seeds, **SAMPLING,
                                               input_img_tokens=[t.expand(len(seeds), -1) for t in idx_Bl],
                                               edit_mask=torch.tensor(keep_PP, dtype=torch.float32))
    finally:
        del quant.get_next_autoregressive_input
        torch.set_num_threads(threads)
    n_checked = 0
    for si, (pn, h_BChw, idx_1l) in enumerate(zip(var.patch_nums, used, idx_Bl)):
        inside = torch.from_numpy(surely_kept(keep_PP, pn))
        input_1Chw = quant.embedding(idx_1l).transpose(1, 2).reshape(1, -1, pn, pn)
        assert torch.equal(h_BChw[:, :, inside], input_1Chw[:, :, inside].expand(len(seeds), -1, -1)), \
            f'scale {si} ({pn}x{pn}): a kept cell does not hold the input image\'s token'
        n_checked += int(inside.sum())
    assert n_checked >= keep_PP.sum()
    return to_uint8(recon)[0], to_uint8(gen)


def read_input(path) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1] with plain PIL (an RGB 64 px PNG: no resize, no crop)."""
    arr = np.array(Image.open(path).convert('RGB'))
    assert arr.shape == (64, 64, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float().div(255).mul(2).sub(1)


def assert_edit(res_HW3, recon_HW3, gen_HW3, keep_PP):
    kp = keep_px(keep_PP)
    assert res_HW3.shape == (64, 64, 3)
    assert np.array_equal(res_HW3[kp], recon_HW3[kp]), 'kept cells must equal the tokenizer\'s reconstruction of the input'
    assert np.array_equal(res_HW3[~kp], gen_HW3[~kp]), 'redrawn cells must be what the sampler draws with this mask'
    assert np.abs(res_HW3[~kp] - recon_HW3[~kp]).mean() > 1, 'the redrawn cells are generated anew'


@pytest.mark.parametrize('mode, box, keep', [
    ('inpaint', '0.25,0.25,0.75,0.75', [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]),
    ('outpaint', '0.25,0.25,0.75,0.75', [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]),
    ('class', '0,0,0.5,1', [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]),
])
def test_edit_keeps_the_reconstruction_where_it_must(setup, tmp_path, mode, box, keep):
    d, image, vae, var = setup
    keep_PP = np.array(keep)
    class_id = 3 if mode == 'class' else -1
    edit(d, image, tmp_path / 'out.png', f'--mode={mode}', f'--box={box}', f'--class_id={class_id}', '--seed=4')
    recon, gen = expected_edit(vae, var, read_input(image), keep_PP, class_id, [4])
    assert_edit(read(tmp_path / 'out.png'), recon, gen[0], keep_PP)
    if mode == 'class':                           # another class redraws the region otherwise
        _, gen_other = expected_edit(vae, var, read_input(image), keep_PP, 1, [4])
        kp = keep_px(keep_PP)
        assert np.abs(gen_other[0][~kp] - gen[0][~kp]).mean() > 1, '--class_id must change the redrawn region'


def test_mask_image_and_several_versions(setup, tmp_path):
    d, image, vae, var = setup
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255                      # the right half is the region
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    edit(d, image, tmp_path / 'e.png', '--mode=inpaint', f'--mask={tmp_path / "mask.png"}', '--n=2', '--seed=7')
    keep_PP = np.array([[1, 1, 0, 0]] * 4)
    recon, gen = expected_edit(vae, var, read_input(image), keep_PP, -1, [7, 8])
    a, b = (read(tmp_path / f'e_{k}.png') for k in (0, 1))
    assert_edit(a, recon, gen[0], keep_PP)
    assert_edit(b, recon, gen[1], keep_PP)
    assert not np.array_equal(a[:, 32:], b[:, 32:]), 'two seeds, two versions'


def test_mask_follows_the_image_through_resize_and_centre_crop(setup, tmp_path):
    """A landscape photo (64 x 128): the model sees its centre 64 x 64; the mask marks the right half of that centre."""
    d, image, vae, var = setup
    photo = np.random.RandomState(0).randint(0, 256, (64, 128, 3)).astype(np.uint8)
    photo[:, 32:96] = np.asarray(Image.open(image).convert('RGB'))      # the centre crop is the 64 px input image
    Image.fromarray(photo).save(tmp_path / 'photo.png')
    mask = np.zeros((64, 128), dtype=np.uint8)
    mask[:, 64:96] = 255                    # photo columns 64..96: columns 32..64 of the crop, token columns 2 and 3
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    edit(d, tmp_path / 'photo.png', tmp_path / 'e.png', '--mode=inpaint', f'--mask={tmp_path / "mask.png"}', '--seed=2')
    keep_PP = np.array([[1, 1, 0, 0]] * 4)
    recon, gen = expected_edit(vae, var, read_input(image), keep_PP, -1, [2])
    assert_edit(read(tmp_path / 'e.png'), recon, gen[0], keep_PP)

    outside = np.zeros((64, 128), dtype=np.uint8)
    outside[:, :32] = 255                   # only outside the centre crop
    Image.fromarray(outside).save(tmp_path / 'outside.png')
    res = edit(d, tmp_path / 'photo.png', tmp_path / 'x.png', f'--mask={tmp_path / "outside.png"}', check=False)
    assert res.returncode == 1 and 'marks no token cell' in res.stderr and 'Traceback' not in res.stderr, res.stderr[-2000:]


@pytest.mark.parametrize('flags, message', [
    (['--class_id=5'], '--class_id=5 is outside [-1, 4]'),
    (['--top_k=65'], '--top_k=65 is outside [0, 64]'),
])
def test_out_of_range_flags_stop_the_cli_before_any_file_is_read(setup, tmp_path, flags, message):
    d, _, _, _ = setup
    res = run_script(['edit.py', f'--image={tmp_path / "missing.png"}', f'--var_ckpt={tmp_path / "missing.pth"}',
                      f'--vae_ckpt={tmp_path / "missing.pth"}', *MODEL_FLAGS, *SAMPLING_FLAGS, '--box=0,0,0.5,0.5', *flags],
                     check=False)
    assert res.returncode == 1 and message in res.stderr, res.stderr[-2000:]
    assert 'Traceback' not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_corrupt_image_stops_the_cli_cleanly(setup, tmp_path):
    d, image, _, _ = setup
    truncated = tmp_path / 'truncated.png'
    truncated.write_bytes(image.read_bytes()[:200])
    res = edit(d, truncated, tmp_path / 'x.png', '--box=0,0,0.5,0.5', check=False)
    assert res.returncode == 1 and f'cannot read the image {truncated}' in res.stderr, res.stderr
    assert 'Traceback' not in res.stderr and not (tmp_path / 'x.png').exists()


@pytest.mark.parametrize('flags, error, message', [
    (['--mode=class', '--box=0,0,0.5,0.5'], 'FlagError', '--mode=class needs the target --class_id'),
    (['--mode=inpaint'], 'FlagError', 'exactly one of --box=y0,x0,y1,x1 or --mask=PATH'),
    (['--box=0.5,0,0.1,1'], 'FlagError', '0 <= y0 < y1 <= 1'),
    (['--box=0,0,1'], 'FlagError', 'must be four numbers'),
    (['--mode=paint', '--box=0,0,1,1'], 'FlagError', "--mode='paint' must be one of inpaint, outpaint, class"),
    (['--box=0,0,1,1', '--n=0'], 'FlagError', '--n=0 must be >= 1'),
    (['--box=0,0,1,1', '--seed=-1'], 'FlagError', '--seed=-1 must be in [0, 2^63 - n]'),
    (['--box=0,0,1,1', '--cfg=nan'], 'FlagError', '--cfg=nan must be a finite number'),
    (['--box=0,0,1,1', '--out=x.jpg'], 'FlagError', "--out='x.jpg' must end in .png"),
    (['--box=0,0,1,1', '--class_id=-2'], 'FlagError', '--class_id=-2 is outside [-1, 4]'),
    (['--box=0,0,1,1', '--top_k=-1'], 'FlagError', '--top_k=-1 is outside [0, 64]'),
    (['--box=0,0,1,1', '--top_p=1.5'], 'FlagError', '--top_p=1.5 is outside (0, 1]'),
    (['--box=0,0,1,1', '--pn=4_2'], 'FlagError', 'must list increasing positive sides'),
    (['--box=0,0,1,1', '--image='], 'FlagError', '--image is required'),
    (['--box=0,0,1,1', '--image={missing}'], 'UserError', 'cannot read the image {missing}'),
    (['--box=0,0,1,1', '--image={garbage}'], 'UserError', 'cannot read the image {garbage}'),
    (['--mask={missing}'], 'UserError', 'cannot read the mask image {missing}'),
    (['--mask={garbage}'], 'UserError', 'cannot read the mask image {garbage}'),
    (['--mask={wide}'], 'UserError', 'is 96x64 pixels but the image is 64x64'),
    (['--mask={black}'], 'UserError', 'marks no region'),
    (['--mask={transparent}'], 'UserError', 'marks no region'),
])
def test_edit_flags_and_files_are_checked_before_the_model(setup, tmp_path, flags, error, message):
    """In-process (fast): the checkpoints do not exist, so reaching the model would be another error."""
    import edit
    _, image, _, _ = setup
    names = {k: tmp_path / f'{k}.png' for k in ('missing', 'garbage', 'black', 'transparent', 'wide')}
    names['garbage'].write_bytes(b'\x89PNG\r\n\x1a\n not really')
    Image.new('L', (96, 64), 255).save(names['wide'])
    Image.new('L', (64, 64), 0).save(names['black'])
    Image.new('RGBA', (64, 64), (255, 255, 255, 0)).save(names['transparent'])      # white but fully transparent
    argv = [f'--image={image}', f'--var_ckpt={tmp_path / "no.pth"}', f'--vae_ckpt={tmp_path / "no.pth"}', *MODEL_FLAGS,
            *SAMPLING_FLAGS, f'--out={tmp_path / "x.png"}'] + [f.format(**names) for f in flags]
    with pytest.raises(Exception) as e:
        edit.main(edit.parse_edit_args(argv))
    assert type(e.value).__name__ == error and message.format(**names) in str(e.value)


def test_class_and_token_ranges_of_a_train_py_checkpoint_are_its_own(setup, tmp_path):
    """A train.py checkpoint brings its class count and vocabulary: checked once it is read, whatever the flags say."""
    d, image, vae, var = setup
    args = dict(patch_nums=(1, 2, 3, 4), vocab_size=64, z_channels=8, vae_ch=32, share_quant_resi=4, num_classes=5, depth=2,
                saln=False, anorm=True)
    torch.save({'epoch': 1, 'iter': 0, 'args': args,
                'trainer': {'var_wo_ddp': var.state_dict(), 'vae_local': vae.state_dict()}}, tmp_path / 'ar-ckpt-last.pth')
    res = run_script(['edit.py', f'--image={image}', f'--var_ckpt={tmp_path / "ar-ckpt-last.pth"}', '--box=0,0,0.5,0.5',
                      '--class_id=7', '--top_k=20', f'--out={tmp_path / "x.png"}'], check=False)
    assert res.returncode == 1 and '--class_id=7 is outside [-1, 4]: the model has 5 classes (the checkpoint)' in res.stderr, res.stderr[-2000:]
    assert 'Traceback' not in res.stderr and not (tmp_path / 'x.png').exists()
