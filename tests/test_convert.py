"""cpu_kernels.convert: a converted model has the plain one's parameters, buffers and state-dict keys, and computes the
same (within the tolerances of the kernel tests) for the tokenizer, teacher forcing with its gradients, and sampling."""
import copy

import pytest
import torch
import torch.nn as nn

import cpu_kernels
from conftest import build_tiny
from cpu_kernels.convert import FAST_CLASSES
from models import VAR, VQVAE


def test_converted_models_keep_every_state_dict_key_and_tensor():
    vae, var = build_tiny()
    plain_vae, plain_var = {k: v.clone() for k, v in vae.state_dict().items()}, {k: v.clone() for k, v in var.state_dict().items()}
    params_before = [id(p) for p in list(vae.parameters()) + list(var.parameters())]
    assert cpu_kernels.convert(var) is var   # a VAR converts its tokenizer too
    assert type(vae) is not VQVAE and isinstance(vae, VQVAE) and isinstance(var, VAR)
    for plain, got in ((plain_vae, vae.state_dict()), (plain_var, var.state_dict())):
        assert list(got) == list(plain)
        assert all(torch.equal(got[k], plain[k]) for k in plain)
    assert [id(p) for p in list(vae.parameters()) + list(var.parameters())] == params_before   # the same tensors, in place
    for m in list(vae.modules()) + list(var.modules()):   # every plain module with a fast counterpart is converted
        assert type(m) not in FAST_CLASSES, type(m).__name__
    again = [type(m) for m in var.modules()]
    cpu_kernels.convert(var)
    assert [type(m) for m in var.modules()] == again   # converting twice changes nothing
    # a plain model loads a converted one's checkpoint strictly, and the other way round
    other_vae, other_var = build_tiny(seed=3)
    other_vae.load_state_dict(vae.state_dict(), strict=True)
    other_var.load_state_dict(var.state_dict(), strict=True)
    var.load_state_dict(plain_var, strict=True)
    assert type(copy.deepcopy(var).blocks[0]) is type(var.blocks[0])   # an EMA copy keeps the fast classes


def test_modules_outside_a_tokenizer_or_transformer_are_left_alone():
    outer = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(3, 3, 3))
    assert cpu_kernels.convert(outer) is outer and [type(m) for m in outer] == [nn.Linear, nn.Conv2d]


@torch.no_grad()
def test_converted_tokenizer_and_transformer_compute_what_the_plain_ones_do():
    (vae, var), (fast_vae, fast_var) = build_tiny(), build_tiny(fast=True)
    for m in (var, fast_var):
        m.cond_drop_rate = 0.0
    img = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert (fast_vae.encode(img) - vae.encode(img)).abs().max() < 1e-4
    idx_Bl = vae.img_to_idxBl(img)
    assert all(torch.equal(a, b) for a, b in zip(fast_vae.img_to_idxBl(img), idx_Bl))
    assert (fast_vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)
            - vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True)).abs().max() < 1e-3
    labels, x_BLCv = torch.tensor([0, 3, 4]), vae.quantize.idxBl_to_var_input(idx_Bl)
    assert (fast_var(labels, x_BLCv) - var(labels, x_BLCv)).abs().max() < 1e-4
    kw = dict(B=3, label_B=labels, g_seed=5, cfg=1.5, top_k=10, top_p=0.9)
    assert (fast_var.autoregressive_infer_cfg(**kw) - var.autoregressive_infer_cfg(**kw)).abs().max() < 1e-3


@pytest.mark.parametrize('shared_aln', [False, True])
def test_converted_training_step_gives_the_plain_gradients(shared_aln):
    (_, var), (_, fast_var) = build_tiny(shared_aln=shared_aln), build_tiny(shared_aln=shared_aln, fast=True)
    g = torch.Generator().manual_seed(1)
    labels, x_BLCv = torch.tensor([1, 2]), torch.randn(2, var.L - var.first_l, var.Cvae, generator=g)
    grads = []
    for m in (var, fast_var):
        m.train()
        m.cond_drop_rate = 0.0
        torch.manual_seed(0)   # the same drop-path draws
        m(labels, x_BLCv).square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n, want in grads[0].items():
        assert (grads[1][n] - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), n
