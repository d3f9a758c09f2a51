"""Image summaries in tensorboard, read back with tensorboard's own event reader: train.py's sample grids, train_vae.py's reconstructions."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN_FLAGS, run_script

TINY_VAE_FLAGS = ['--vocab_size=64', '--z_channels=8', '--vae_ch=32', '--pn=1_2_3_4']


def read_images(out: Path):
    """{tag: [(step, (H, W, 3) uint8)]} of every tensorboard run folder in `out`."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    images = {}
    for d in [p for p in out.iterdir() if p.is_dir() and p.name.startswith('tb-')]:
        acc = EventAccumulator(str(d), size_guidance={'images': 0})   # 0: keep every image
        acc.Reload()
        for tag in acc.Tags()['images']:
            images.setdefault(tag, []).extend(
                (e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert('RGB'))) for e in acc.Images(tag))
    return {k: sorted(v, key=lambda x: x[0]) for k, v in images.items()}


@pytest.fixture
def one_thread():
    """Recompute in this process with one thread, as the scripts ran (OMP_NUM_THREADS=1), for bitwise comparisons."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_vis_epochs_due():
    from utils.vis import vis_epochs_due
    assert [e for e in range(1, 26) if vis_epochs_due(e, 25, 0)] == [3, 6, 9, 12, 15, 18, 21, 24, 25]   # a tenth, rounded up
    assert [e for e in range(1, 4) if vis_epochs_due(e, 3, 0)] == [1, 2, 3]
    assert [e for e in range(1, 6) if vis_epochs_due(e, 5, 2)] == [2, 4, 5]
    assert not any(vis_epochs_due(e, 5, -1) for e in range(1, 6))


def test_train_py_writes_sample_grids_of_the_ema_weights(shapes_data, tiny_vae_ckpt, tmp_path, one_thread):
    from utils.arg_util import ModelFlags
    from utils.cpu_speed import speed_up
    from utils.model_loading import load_for_sampling
    from utils.vis import fixed_classes, sample_grid
    from models.weights import load_weights, save_weights
    # the tokenizer given as safetensors: train.py's --vae_ckpt reads it
    vae_st = tmp_path / 'tiny_vae.safetensors'
    save_weights(load_weights(str(tiny_vae_ckpt)), str(vae_st))
    out = tmp_path / 'run'
    run_script(['train.py', f'--data_path={shapes_data}', f'--vae_ckpt={vae_st}', f'--local_out_dir_path={out}', *TINY_TRAIN_FLAGS,
                '--bs=8', '--ep=3', '--ema=0.99', '--seed=5', '--fixed_tlr=1e-2', '--vis_every_ep=2', '--save_pretrained=0'])
    assert not (out / 'pretrained').exists()
    images = read_images(out)
    grids = images['AR_samples/fixed_classes_and_seeds']
    assert [step for step, _ in grids] == [2, 3]   # every 2 epochs and after the last
    assert grids[0][1].shape == (64 + 4, 8 * (64 + 2) + 2, 3)   # 8 samples of 64 px in a row
    assert not np.array_equal(grids[0][1], grids[1][1])          # training moved the weights
    # the last grid is the EMA weights' samples of the fixed classes and seeds, bit for bit
    flags = dict(var_ckpt=str(out / 'ar-ckpt-last.pth'), fuse=False)
    _, var_ema, _ = load_for_sampling(torch.device('cpu'), ModelFlags(ema=True, **flags))
    speed_up(var_ema)   # as train.py's
    assert np.array_equal(grids[1][1], sample_grid(var_ema, fixed_classes(6), seed=5))
    _, var_trained, _ = load_for_sampling(torch.device('cpu'), ModelFlags(ema=False, **flags))
    speed_up(var_trained)
    assert not np.array_equal(grids[1][1], sample_grid(var_trained, fixed_classes(6), seed=5))   # not the trained weights


def test_train_vae_writes_reconstructions_and_safetensors(tiny_shapes, tmp_path, one_thread):
    from models import VQVAE
    from utils.cpu_speed import speed_up
    from utils.vis import reconstruction_grids
    from models.weights import load_weights
    out = tmp_path / 'vae'
    run_script(['train_vae.py', f'--data_path={tiny_shapes}', f'--local_out_dir_path={out}', *TINY_VAE_FLAGS, '--bs=4', '--ep=2',
                '--lr=1e-3', '--lpips_weight=0', '--disc_start=-1', '--seed=0'])
    images = read_images(out)
    final, per_scale = images['VAE_reconstructions/final'], images['VAE_reconstructions/per_scale']
    assert [s for s, _ in final] == [1, 2] and [s for s, _ in per_scale] == [1, 2]   # every validation (--val_every_ep=1)
    side = 64 + 2
    assert final[-1][1].shape == (4 * side + 2, 2 * side + 2, 3)          # 4 val images: input | all scales
    assert per_scale[-1][1].shape == (4 * side + 2, 5 * side + 2, 3)      # input | scale 1, 1-2, 1-3, 1-4
    # vae.safetensors beside vae.pth, the same weights; the last grid is the final tokenizer's reconstructions
    st, pth = load_weights(str(out / 'vae.safetensors')), load_weights(str(out / 'vae.pth'))
    assert st.keys() == pth.keys() and all(torch.equal(st[k], pth[k]) for k in st)
    vae = VQVAE(vocab_size=64, z_channels=8, ch=32, v_patch_nums=(1, 2, 3, 4), test_mode=True)
    vae.load_state_dict(st, strict=True)
    speed_up(vae)   # as train_vae.py's
    from utils.data import build_dataset
    _, _, val_set, _ = build_dataset(str(tiny_shapes), final_reso=64, hflip=False, mid_reso=1.125, seed=0)
    inp_B3HW = torch.stack([val_set[i][0] for i in range(4)])
    grids = reconstruction_grids(vae, inp_B3HW)
    assert np.array_equal(grids['final'], final[-1][1]) and np.array_equal(grids['per_scale'], per_scale[-1][1])
