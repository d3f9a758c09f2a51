"""Numbers of the reference implementation (../shared/reference/golden_small.pt) on the CPU in float32, by the plain
models and by the models converted for speed (cpu_kernels.convert; skipped where that package is absent)."""
import pytest
import torch

from conftest import cpu_kernels_importable, reference_file
from models import build_vae_var, make_edit_mask

FEAT_TOL = 1e-4
IMG_TOL = 1e-3


def load_golden(device):
    """The golden file and its tokenizer and VAR built on `device`, loaded strictly, in eval mode."""
    g = torch.load(reference_file('golden_small.pt'), weights_only=False, map_location='cpu')
    c = g['config']
    vae, var = build_vae_var(
        device=device, patch_nums=c['patch_nums'], V=c['V'], Cvae=c['Cvae'], ch=c['ch'], share_quant_resi=c['share_quant_resi'],
        num_classes=c['num_classes'], depth=c['depth'], shared_aln=c['shared_aln'], attn_l2_norm=c['attn_l2_norm'],
        flash_if_available=False, fused_if_available=False,
    )
    vae.load_state_dict(g['vae_state'], strict=True)
    var.load_state_dict(g['var_state'], strict=True)
    vae.eval()
    var.eval()
    return g, vae, var


@pytest.fixture(scope='module', params=['plain', 'converted'])
def golden(request):
    g, vae, var = load_golden('cpu')
    if request.param == 'converted':
        if not cpu_kernels_importable():
            pytest.skip('cpu_kernels is not importable here: the plain models only')
        import cpu_kernels
        cpu_kernels.convert(vae)
        cpu_kernels.convert(var)
    return g, vae, var


def assert_close(got, want, tol, what):
    assert got.shape == want.shape, f'{what}: shape {tuple(got.shape)} != {tuple(want.shape)}'
    err = (got - want).abs().max().item()
    assert err <= tol, f'{what}: max abs error {err:.3g} > {tol:g}'


@torch.no_grad()
def test_tokenizer_features_and_tokens(golden):
    g, vae, _ = golden
    f = vae.quant_conv(vae.encoder(g['img']))
    assert_close(f, g['f'], FEAT_TOL, 'f')
    idx_Bl = vae.img_to_idxBl(g['img'])
    assert len(idx_Bl) == len(g['idx_Bl'])
    for si, (got, want) in enumerate(zip(idx_Bl, g['idx_Bl'])):
        assert torch.equal(got, want), f'token map of scale {si} differs in {(got != want).sum().item()} positions'
    for si, (got, want) in enumerate(zip(vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True), g['f_hats'])):
        assert_close(got, want, FEAT_TOL, f'f_hat of scale {si}')
    assert_close(vae.quantize.idxBl_to_var_input(g['idx_Bl']), g['x_BLCv_wo_first_l'], FEAT_TOL, 'x_BLCv_wo_first_l')


@torch.no_grad()
def test_tokenizer_reconstructions(golden):
    g, vae, _ = golden
    assert_close(vae.idxBl_to_img(g['idx_Bl'], same_shape=True, last_one=True), g['recon_last'], IMG_TOL, 'recon_last')
    recon_all = vae.idxBl_to_img(g['idx_Bl'], same_shape=True, last_one=False)
    assert len(recon_all) == len(g['recon_all'])
    for si, (got, want) in enumerate(zip(recon_all, g['recon_all'])):
        assert_close(got, want, IMG_TOL, f'recon_all[{si}]')
    assert_close(vae.img_to_reconstructed_img(g['img'], last_one=True), g['recon_img_last'], IMG_TOL, 'recon_img_last')


@torch.no_grad()
def test_teacher_forcing_logits(golden):
    g, _, var = golden
    var.cond_drop_rate = 0
    try:
        logits_BLV = var(g['labels'], g['x_BLCv_wo_first_l'])
    finally:
        var.cond_drop_rate = 0.1
    assert logits_BLV.dtype == torch.float32
    assert_close(logits_BLV, g['logits_BLV'], IMG_TOL, 'logits_BLV')


@pytest.mark.parametrize('case', range(5))
def test_seeded_samples(golden, case):
    g, _, var = golden
    if case >= len(g['samples']):
        pytest.skip('no such sample in the golden file')
    s = g['samples'][case]
    args = dict(s['args'])
    label_B = {'given': g['labels'], 'none': None, 'int': 1}[args.pop('labels')]
    images = var.autoregressive_infer_cfg(B=g['config']['B'], label_B=label_B, **args)
    assert_close(images, s['images'], IMG_TOL, f'samples[{case}] {s["args"]}')
    again = var.autoregressive_infer_cfg(B=g['config']['B'], label_B=label_B, **args)
    assert torch.equal(images, again), 'the same g_seed must give the same images'


@pytest.mark.parametrize('case', range(2))
def test_zero_shot_edits(golden, case):
    g, _, var = golden
    if case >= len(g['edits']):
        pytest.skip('no such edit in the golden file')
    e = g['edits'][case]
    a = e['args']
    images = var.autoregressive_infer_cfg(
        B=g['config']['B'], label_B=e['label_B'], input_img_tokens=g['idx_Bl'], edit_mask=e['edit_mask'],
        cfg=a['cfg'], top_k=a['top_k'], top_p=a['top_p'], g_seed=a['g_seed'], more_smooth=a['more_smooth'])
    assert_close(images, e['images'], IMG_TOL, f'edits[{case}] {a}')
    # the box helper makes the same mask the reference was given
    pn = g['config']['patch_nums'][-1]
    mask = make_edit_mask(a['box'], 'inpaint' if a['inpainting'] else 'outpaint', (pn, pn))
    assert torch.equal(mask, e['edit_mask'].float())
