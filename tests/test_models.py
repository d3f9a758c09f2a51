"""Configurations of the tokenizer and transformer, initialisation, training-mode behaviour, no side effects."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import REPO, TINY, build_tiny
from models import VAR, VQVAE, VectorQuantizer2, build_vae_var


@pytest.mark.parametrize('share, keys', [
    (0, ['quantize.quant_resi.0.weight', 'quantize.quant_resi.3.bias']),
    (1, ['quantize.quant_resi.qresi.weight', 'quantize.quant_resi.qresi.bias']),
    (2, ['quantize.quant_resi.qresi_ls.0.weight', 'quantize.quant_resi.qresi_ls.1.weight']),
    (4, ['quantize.quant_resi.qresi_ls.3.weight']),
])
def test_phi_sharing_key_layout(share, keys):
    vae = VQVAE(vocab_size=16, z_channels=4, ch=32, share_quant_resi=share, v_patch_nums=(1, 2, 3, 4))
    phi_keys = [k for k in vae.state_dict() if 'quant_resi' in k]
    for k in keys:
        assert k in phi_keys
    n_convs = {0: 4, 1: 1, 2: 2, 4: 4}[share]
    assert len(phi_keys) == 2 * n_convs


@pytest.mark.parametrize('share, SN, expected', [
    (4, 10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),   # the published tokenizer's scales
    (2, 10, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
    (3, 6, [0, 0, 1, 1, 2, 2]),
    (0, 6, [0, 1, 2, 3, 4, 5]),
])
def test_phi_tick_rule(share, SN, expected):
    quant = VectorQuantizer2(vocab_size=8, Cvae=4, using_znorm=False, v_patch_nums=tuple(range(1, SN + 1)), share_quant_resi=share)
    convs = list(quant.quant_resi.qresi_ls) if share >= 2 else list(quant.quant_resi)
    got = [next(i for i, c in enumerate(convs) if c is quant.quant_resi[si / (SN - 1)]) for si in range(SN)]
    assert got == expected


def test_phi_formula():
    quant = VectorQuantizer2(vocab_size=8, Cvae=4, using_znorm=False, v_patch_nums=(1, 2), share_quant_resi=1)
    phi = quant.quant_resi[0.0]
    h = torch.randn(2, 4, 5, 5)
    want = 0.5 * h + 0.5 * nn.functional.conv2d(h, phi.weight, phi.bias, padding=1)
    assert torch.allclose(phi(h), want, atol=1e-6)


def test_znorm_picks_greatest_cosine():
    torch.manual_seed(0)
    quant = VectorQuantizer2(vocab_size=32, Cvae=8, using_znorm=True, v_patch_nums=(1, 2, 4), share_quant_resi=4).eval()
    f = torch.randn(2, 8, 4, 4)
    idx_first = quant.f_to_idxBl_or_fhat(f, to_fhat=False)[0]
    z = torch.nn.functional.adaptive_avg_pool2d(f, 1).flatten(1)
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(quant.embedding.weight, dim=1).T
    assert torch.equal(idx_first[:, 0], cos.argmax(1))


def test_nearest_entry_without_znorm_is_least_l2():
    torch.manual_seed(0)
    quant = VectorQuantizer2(vocab_size=32, Cvae=8, using_znorm=False, v_patch_nums=(1, 2, 4), share_quant_resi=4).eval()
    f = torch.randn(2, 8, 4, 4)
    idx_first = quant.f_to_idxBl_or_fhat(f, to_fhat=False)[0]
    z = f.mean(dim=(2, 3))
    assert torch.equal(idx_first[:, 0], torch.cdist(z, quant.embedding.weight).argmin(1))


def test_attn_l2_norm_off_uses_fixed_scale():
    _, var = build_tiny(attn_l2_norm=False)
    attn = var.blocks[0].attn
    assert not hasattr(attn, 'scale_mul_1H11') and attn.scale == pytest.approx(0.25 / 8)
    assert 'blocks.0.attn.scale_mul_1H11' not in var.state_dict()
    out = var.autoregressive_infer_cfg(B=1, label_B=0, g_seed=0)
    assert out.shape == (1, 3, 64, 64)


def test_shared_aln_layout_and_init():
    _, var = build_vae_var(device='cpu', **dict(TINY, shared_aln=True))
    sd = var.state_dict()
    assert 'shared_ada_lin.1.weight' in sd and 'blocks.0.ada_gss' in sd and 'blocks.0.ada_lin.1.weight' not in sd
    assert sd['shared_ada_lin.1.weight'].shape == (6 * 128, 128)
    # gamma rows are scaled down by init_adaln_gamma, the others by init_adaln
    gss = var.blocks[0].ada_gss.detach()
    assert gss[:, :, :2].abs().max() < 1e-3 < gss[:, :, 2:].abs().max()


def test_init_weights_follows_the_recipe():
    torch.manual_seed(0)
    _, var = build_vae_var(device='cpu', **dict(TINY, depth=4))
    C = var.C
    std = (1 / C / 3) ** 0.5
    assert var.head.bias.abs().max() == 0 and var.word_embed.bias.abs().max() == 0
    assert var.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.1)
    w = var.blocks[1].ada_lin[-1].weight
    assert w[:2 * C].std().item() == pytest.approx(std * 1e-5, rel=0.1)
    assert w[2 * C:].std().item() == pytest.approx(std * 0.5, rel=0.1)
    assert var.blocks[0].attn.proj.weight.std().item() == pytest.approx(std / (2 * 4) ** 0.5, rel=0.1)
    assert var.blocks[0].ffn.fc2.weight.std().item() == pytest.approx(std / (2 * 4) ** 0.5, rel=0.1)
    assert var.class_emb.weight.std().item() == pytest.approx(std, rel=0.1)
    assert torch.allclose(var.blocks[0].attn.scale_mul_1H11, torch.full((1, 4, 1, 1), 4.0).log())
    dpr = [b.drop_path.drop_prob if hasattr(b.drop_path, 'drop_prob') else 0.0 for b in var.blocks]
    assert dpr == pytest.approx([0.0, 0.1 * 4 / 24 / 3, 0.1 * 4 / 24 * 2 / 3, 0.1 * 4 / 24])


def test_same_seed_same_weights():
    sds = []
    for _ in range(2):
        torch.manual_seed(123)
        vae, var = build_vae_var(device='cpu', **TINY)
        sds.append({**{f'vae.{k}': v for k, v in vae.state_dict().items()}, **var.state_dict()})
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_block_causal_mask_buffer():
    _, var = build_tiny()
    bias = var.attn_bias_for_masking[0, 0]
    lvl = var.lvl_1L[0]
    assert bias.shape == (var.L, var.L) and torch.equal(lvl, torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16))
    assert torch.equal(bias == 0, lvl[:, None] >= lvl[None, :])


def test_condition_dropout_replaces_labels_in_training():
    vae, var = build_tiny()
    x = vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(torch.rand(2, 3, 64, 64) * 2 - 1))
    with torch.no_grad():
        var.cond_drop_rate = 0.0
        uncond = var(torch.full((2,), var.num_classes), x)
        var.cond_drop_rate = 1.0
        dropped = var(torch.tensor([1, 2]), x)
        var.cond_drop_rate = 0.0
        cond = var(torch.tensor([1, 2]), x)
    assert torch.allclose(dropped, uncond) and not torch.allclose(cond, uncond)


def test_drop_path_only_while_training():
    from models.helpers import DropPath
    vae, _ = build_tiny()
    var = VAR(vae, num_classes=5, depth=3, embed_dim=64, num_heads=4, drop_path_rate=0.5, patch_nums=TINY['patch_nums'])
    var.init_weights(init_adaln_gamma=1.0)
    assert [type(b.drop_path).__name__ for b in var.blocks] == ['Identity', 'DropPath', 'DropPath']
    assert isinstance(var.blocks[2].drop_path, DropPath) and var.blocks[2].drop_path.drop_prob == 0.5
    x = torch.randn(8, var.L - 1, var.Cvae)
    labels = torch.arange(8) % 5
    var.cond_drop_rate = 0.0
    var.eval()
    with torch.no_grad():
        a, b = var(labels, x), var(labels, x)
    assert torch.equal(a, b)
    var.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c = var(labels, x)
    per_sample_same = [(a[i] - c[i]).abs().max().item() < 1e-6 for i in range(8)]
    assert not all(per_sample_same), 'some samples must have a dropped branch'


def test_grad_checkpointing_gives_the_same_gradients():
    vae, var = build_tiny()
    var.train()
    var.cond_drop_rate = 0.0
    x = torch.randn(2, var.L - 1, var.Cvae)
    labels = torch.tensor([1, 3])
    grads = []
    for ckpt in (False, True):
        var.grad_ckpt = ckpt
        var.zero_grad()
        torch.manual_seed(0)
        var(labels, x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_forward_and_sampling_on_cpu(dtype):
    vae, var = build_tiny()
    var.cond_drop_rate = 0.0
    x = torch.randn(2, var.L - 1, var.Cvae)
    with torch.no_grad():
        ref = var(torch.tensor([0, 1]), x)
        with torch.autocast('cpu', dtype=dtype):
            low = var(torch.tensor([0, 1]), x)
            img = var.autoregressive_infer_cfg(B=2, label_B=0, g_seed=0)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()


def test_tokenizer_training_forward_straight_through():
    vae, _ = build_tiny()
    vae.train()
    for p in vae.parameters():
        p.requires_grad_(True)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    rec, usages, vq_loss = vae(img, ret_usages=True)
    assert rec.shape == img.shape and vq_loss.item() > 0 and len(usages) == 4
    assert vae.quantize.ema_vocab_hit_SV.sum() > 0
    # the reconstruction loss alone reaches the encoder, through the straight-through estimator only:
    # the gradient arriving at the quantizer's input equals the one leaving its output
    f_BChw = vae.quant_conv(vae.encoder(img))
    f_BChw.retain_grad()
    f_hat_BChw, _, vq_loss = vae.quantize(f_BChw)
    f_hat_BChw.retain_grad()
    vae.decoder(vae.post_quant_conv(f_hat_BChw)).square().mean().backward(retain_graph=True)
    assert f_hat_BChw.grad.abs().sum() > 0 and f_BChw.grad is not None
    assert torch.equal(f_BChw.grad, f_hat_BChw.grad)
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.decoder.conv_out.weight.grad.abs().sum() > 0
    assert vae.quantize.embedding.weight.grad is None             # the codebook learns from the vq loss only
    vae.zero_grad(set_to_none=True)
    vq_loss.backward()
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0


def test_meta_build_allocates_nothing():
    vae, var = build_vae_var(device='meta', depth=30)
    assert all(t.device.type == 'meta' for t in list(var.parameters()) + list(var.buffers()) + list(vae.parameters()))


def test_no_side_effects(capsys):
    reset = {c: c.reset_parameters for c in (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding, nn.GroupNorm)}
    build_tiny()
    out = capsys.readouterr()
    assert out.out == '' and out.err == '', 'building models must not print (use logging)'
    assert all(c.reset_parameters is f for c, f in reset.items()), 'torch.nn classes must not be patched'


def test_import_has_no_side_effects():
    code = ('import sys, torch, torch.nn as nn; f = nn.Linear.reset_parameters; import models, models.var; '
            'assert nn.Linear.reset_parameters is f; '
            'assert not any(isinstance(v, torch.device) for m in (models.var, models.vqvae, models.quant) for v in vars(m).values())')
    res = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == '' and res.stderr == ''


def test_public_api_and_signatures():
    import inspect
    from models import VAR, VQVAE, VectorQuantizer2, build_vae_var  # noqa: F401
    params = list(inspect.signature(build_vae_var).parameters)
    assert params == ['device', 'patch_nums', 'V', 'Cvae', 'ch', 'share_quant_resi', 'num_classes', 'depth', 'shared_aln',
                      'attn_l2_norm', 'flash_if_available', 'fused_if_available', 'init_adaln', 'init_adaln_gamma', 'init_head', 'init_std']
    infer = list(inspect.signature(VAR.autoregressive_infer_cfg).parameters)
    assert infer[:8] == ['self', 'B', 'label_B', 'g_seed', 'cfg', 'top_k', 'top_p', 'more_smooth']
    assert 'input_img_tokens' in infer and 'edit_mask' in infer
    assert list(inspect.signature(VQVAE.img_to_idxBl).parameters) == ['self', 'inp_img_no_grad', 'v_patch_nums']
    assert list(inspect.signature(VQVAE.idxBl_to_img).parameters) == ['self', 'ms_idx_Bl', 'same_shape', 'last_one']
    assert list(inspect.signature(VQVAE.img_to_reconstructed_img).parameters) == ['self', 'x', 'v_patch_nums', 'last_one']
    assert list(inspect.signature(VectorQuantizer2.f_to_idxBl_or_fhat).parameters) == ['self', 'f_BChw', 'to_fhat', 'v_patch_nums']
    assert list(inspect.signature(VectorQuantizer2.get_next_autoregressive_input).parameters) == ['self', 'si', 'SN', 'f_hat', 'h_BChw']
