"""The reference's numbers (../shared/reference/golden_small.pt) on CUDA in float32, TensorFloat32 off.

Token maps must match exactly, features within FEAT_TOL and images and logits within IMG_TOL: the CPU
tolerances of test_golden.py. They hold on CUDA because, with TensorFloat32 off, cuBLAS and cuDNN round
in float32 like the CPU and differ from it only in summation order (about 1e-6 relative here). The
golden seeded samples and edits are not compared: CUDA's random generator draws other numbers than the
CPU's for the same seed, so their tokens differ by design; KV-cached sampling on CUDA is checked against
teacher forcing in test_cuda_attention.py instead.
"""
import pytest
import torch

from cuda_util import CUDA_MARKS, DEVICE, ieee_fp32
from test_golden import FEAT_TOL, IMG_TOL, assert_close, load_golden

pytestmark = CUDA_MARKS


@pytest.fixture(scope='module')
def golden_cuda():
    g, vae, var = load_golden(DEVICE)
    with ieee_fp32():
        yield g, vae, var


def cuda_list(ts):
    return [t.to(DEVICE) for t in ts]


def cpu(t):
    return t.cpu() if torch.is_tensor(t) else [x.cpu() for x in t]


@torch.no_grad()
def test_tokenizer_features_and_tokens_on_cuda(golden_cuda):
    g, vae, _ = golden_cuda
    img = g['img'].to(DEVICE)
    f = vae.quant_conv(vae.encoder(img))
    assert f.device.type == DEVICE.type
    assert_close(f.cpu(), g['f'], FEAT_TOL, 'f')
    idx_Bl = cpu(vae.img_to_idxBl(img))
    assert len(idx_Bl) == len(g['idx_Bl'])
    for si, (got, want) in enumerate(zip(idx_Bl, g['idx_Bl'])):
        assert torch.equal(got, want), f'token map of scale {si} differs in {(got != want).sum().item()} of {want.numel()} positions'
    for si, (got, want) in enumerate(zip(cpu(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)), g['f_hats'])):
        assert_close(got, want, FEAT_TOL, f'f_hat of scale {si}')
    assert_close(vae.quantize.idxBl_to_var_input(cuda_list(g['idx_Bl'])).cpu(), g['x_BLCv_wo_first_l'], FEAT_TOL, 'x_BLCv_wo_first_l')


@torch.no_grad()
def test_tokenizer_reconstructions_on_cuda(golden_cuda):
    g, vae, _ = golden_cuda
    idx_Bl = cuda_list(g['idx_Bl'])
    assert_close(vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).cpu(), g['recon_last'], IMG_TOL, 'recon_last')
    recon_all = cpu(vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=False))
    assert len(recon_all) == len(g['recon_all'])
    for si, (got, want) in enumerate(zip(recon_all, g['recon_all'])):
        assert_close(got, want, IMG_TOL, f'recon_all[{si}]')
    assert_close(vae.img_to_reconstructed_img(g['img'].to(DEVICE), last_one=True).cpu(), g['recon_img_last'], IMG_TOL, 'recon_img_last')


@torch.no_grad()
def test_teacher_forcing_logits_on_cuda(golden_cuda):
    g, _, var = golden_cuda
    assert var.attn_backend == 'sdpa'
    var.cond_drop_rate = 0
    try:
        logits_BLV = var(g['labels'].to(DEVICE), g['x_BLCv_wo_first_l'].to(DEVICE))
    finally:
        var.cond_drop_rate = 0.1
    assert logits_BLV.device.type == DEVICE.type and logits_BLV.dtype == torch.float32
    assert_close(logits_BLV.cpu(), g['logits_BLV'], IMG_TOL, 'logits_BLV')


@torch.no_grad()
def test_seeded_sampling_on_cuda_repeats_and_decodes_its_tokens(golden_cuda):
    """The golden samples' settings on CUDA: the same g_seed gives the same images, and they are the tokenizer's decoding."""
    g, vae, var = golden_cuda
    s = g['samples'][1]['args']
    kw = dict(cfg=s['cfg'], top_k=s['top_k'], top_p=s['top_p'], more_smooth=False, g_seed=s['g_seed'])
    idx = {}
    images = var.autoregressive_infer_cfg(B=g['config']['B'], label_B=g['labels'].to(DEVICE), on_scale=lambda si, _, i: idx.__setitem__(si, i), **kw)
    again = var.autoregressive_infer_cfg(B=g['config']['B'], label_B=g['labels'].to(DEVICE), **kw)
    assert images.device.type == DEVICE.type and torch.equal(images, again), 'the same g_seed must give the same images on CUDA'
    decoded = vae.idxBl_to_img([idx[si] for si in range(len(var.patch_nums))], same_shape=True, last_one=True).add(1).mul(0.5)
    assert_close(images.cpu(), decoded.cpu(), FEAT_TOL, 'sampled images vs decoding their tokens')
