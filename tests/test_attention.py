"""Attention paths agree with a plain matmul-softmax reference; KV-cached sampling agrees with teacher forcing, by the
plain models and by the converted ones (cpu_kernels, where importable; its own attention tests: test_cpu_attention.py)."""
import logging

import pytest
import torch

from conftest import build_tiny, cpu_kernels_importable
from models.attention import BACKENDS, attention, backend_status, choose_backend
from models.basic_var import SelfAttention


def reference_attention(q, k, v, scale, bias):
    w = (q.double() @ k.double().transpose(-2, -1)) * scale
    if bias is not None:
        w = w + (bias.double() if bias.dtype != torch.bool else torch.zeros_like(w).masked_fill(~bias, float('-inf')))
    return (w.softmax(-1) @ v.double()).float()


def block_causal_bias(patch_nums, as_bool):
    lvl = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)])
    keep = lvl[:, None] >= lvl[None, :]
    return keep[None, None] if as_bool else torch.where(keep, 0.0, -torch.inf)[None, None]


CPU_BACKENDS = [b for b in BACKENDS if backend_status(b)[0] and b in ('sdpa', 'math')]


@pytest.mark.parametrize('backend', CPU_BACKENDS)
@pytest.mark.parametrize('mask', ['none', 'float', 'bool'])
def test_attention_backends_match_reference(backend, mask):
    torch.manual_seed(0)
    B, H, c = 3, 4, 16
    patch_nums = (1, 2, 3, 4)
    L = sum(pn * pn for pn in patch_nums)
    q, k, v = (torch.randn(B, H, L, c) for _ in range(3))
    bias = None if mask == 'none' else block_causal_bias(patch_nums, as_bool=(mask == 'bool'))
    got = attention(q, k, v, scale=0.3, attn_bias=bias, backend=backend)
    want = reference_attention(q, k, v, 0.3, bias)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize('l2', [True, False])
def test_self_attention_module_paths_agree(l2):
    torch.manual_seed(0)
    attn = SelfAttention(block_idx=0, embed_dim=64, num_heads=4, attn_l2_norm=l2).eval()
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(2, 30, 64)
    bias = block_causal_bias((1, 2, 5), as_bool=False)
    outs = {}
    for backend in CPU_BACKENDS:
        attn.backend = backend
        outs[backend] = attn(x, attn_bias=bias)
    for backend, out in outs.items():
        assert (out - outs['math']).abs().max().item() < 1e-5, backend


def test_default_backend_is_sdpa_on_cpu_and_logged(caplog):
    assert choose_backend(flash_if_available=True) in ('sdpa', 'flash', 'xformers')
    if not torch.cuda.is_available():
        assert choose_backend(flash_if_available=True) == 'sdpa'
    assert choose_backend(flash_if_available=False) == 'sdpa'
    with caplog.at_level(logging.INFO, logger='models.var'):
        _, var = build_tiny()
    lines = [r.getMessage() for r in caplog.records if 'attention backend' in r.getMessage()]
    assert len(lines) == 1 and lines[0].split('attention backend ')[1].startswith(var.attn_backend)


@pytest.mark.parametrize('fast', [False, True])
@pytest.mark.parametrize('cfg', [0.0, 2.5])
@pytest.mark.parametrize('shared_aln', [False, True])
def test_kv_cached_sampling_matches_teacher_forcing(cfg, shared_aln, fast):
    if fast and not cpu_kernels_importable():
        pytest.skip('cpu_kernels is not importable here')
    vae, var = build_tiny(shared_aln=shared_aln, fast=fast)
    B = 3
    labels = torch.tensor([0, 4, 2])
    record = {}

    def on_scale(si, logits_2BlV, idx_Bl):
        record[si] = (logits_2BlV.clone(), idx_Bl.clone())

    var.autoregressive_infer_cfg(B=B, label_B=labels, g_seed=7, cfg=cfg, top_k=20, top_p=0.9, on_scale=on_scale)
    idx_list = [record[si][1] for si in range(len(var.patch_nums))]
    x_BLCv = vae.quantize.idxBl_to_var_input(idx_list)
    var.cond_drop_rate = 0.0
    with torch.no_grad():
        cond_BLV = var(labels, x_BLCv)
        uncond_BLV = var(torch.full_like(labels, var.num_classes), x_BLCv)
    for si, (bg, ed) in enumerate(var.begin_ends):
        logits_2BlV = record[si][0]
        assert (logits_2BlV[:B] - cond_BLV[:, bg:ed]).abs().max().item() < 1e-4, f'conditional logits of scale {si}'
        assert (logits_2BlV[B:] - uncond_BLV[:, bg:ed]).abs().max().item() < 1e-4, f'unconditional logits of scale {si}'
    # the cache is cleared afterwards
    assert all(b.attn.cached_k is None and not b.attn.caching for b in var.blocks)


def test_set_attn_backend_math_equals_the_default_on_the_cpu(caplog):
    vae, var = build_tiny()
    var.cond_drop_rate = 0.0   # the forward drops labels like the reference's, also in eval
    assert var.attn_backend == 'sdpa' and all(b.attn.backend == 'sdpa' for b in var.blocks)
    labels = torch.tensor([0, 3, 4])
    x_BLCv = vae.quantize.idxBl_to_var_input([torch.randint(0, 64, (3, pn * pn), generator=torch.Generator().manual_seed(pn))
                                              for pn in var.patch_nums])
    with torch.no_grad():
        default_BLV = var(labels, x_BLCv)
        default_img = var.autoregressive_infer_cfg(B=3, label_B=labels, g_seed=5, cfg=1.5, top_k=10)
    with caplog.at_level(logging.INFO, logger='models.var'):
        var.set_attn_backend('math')
    assert var.attn_backend == 'math' and all(b.attn.backend == 'math' for b in var.blocks)
    assert any('attention backend math' in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        math_BLV = var(labels, x_BLCv)
        math_img = var.autoregressive_infer_cfg(B=3, label_B=labels, g_seed=5, cfg=1.5, top_k=10)
    assert (math_BLV - default_BLV).abs().max().item() < 1e-5
    assert (math_img - default_img).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="'nope' is not one of"):
        var.set_attn_backend('nope')
