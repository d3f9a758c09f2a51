"""The scale pass of models/sampling.py as a replaceable piece, and utils/sampling_graphs.py's static pass (owned KV
caches, static buffers: what the CUDA graphs replay) run eagerly on the CPU: the same logits, tokens and images as the
plain pass, bit for bit. The graphs themselves: tests/test_cuda_sampling_graphs.py.
"""
import copy
import logging

import pytest
import torch

from conftest import build_tiny
from models import make_edit_mask
from models.sampling import scale_logits, scale_pass_of
from utils.sampling_graphs import ScaleGraphs, use_cuda_graphs

SAMPLING = dict(cfg=2.0, top_k=20, top_p=0.9)


@pytest.fixture(scope='module')
def models():
    return build_tiny(seed=5)


def sample(var, B, g_seed, **kw):
    """(images, per scale (raw logits of the doubled batch, drawn tokens)) of one call."""
    seen = []
    img = var.autoregressive_infer_cfg(B=B, label_B=None, g_seed=g_seed, **{**SAMPLING, **kw},
                                       on_scale=lambda si, logits_2BlV, idx_Bl: seen.append((logits_2BlV.clone(), idx_Bl.clone())))
    return img, seen


def assert_same(got, want):
    img, seen = got
    img_want, seen_want = want
    assert len(seen) == len(seen_want)
    for si, ((logits, idx), (logits_want, idx_want)) in enumerate(zip(seen, seen_want)):
        assert torch.equal(logits, logits_want), f'scale {si}: logits differ by {(logits - logits_want).abs().max():g}'
        assert torch.equal(idx, idx_want), f'scale {si}: tokens differ'
    assert torch.equal(img, img_want)


def plain_sample(var, B, g_seed):
    """sample() with the plain pass, whatever pass the model has."""
    graphs = var.__dict__.pop('scale_logits')
    try:
        return sample(var, B, g_seed)
    finally:
        var.scale_logits = graphs


@pytest.fixture
def plain_after(models):
    """The model, with whatever scale pass a test gives it removed afterwards."""
    _, var = models
    yield var
    var.__dict__.pop('scale_logits', None)


def test_the_loop_calls_the_models_scale_pass(models, plain_after):
    """Without a converter the plain function runs; a replacement set on the model is called once per scale, in order,
    and one that delegates to the plain function changes nothing."""
    var = plain_after
    assert scale_pass_of(var) is scale_logits
    want = sample(var, 2, g_seed=3)
    calls = []

    def counting(var_, si, x_2BlC, cond_2BD_or_gss, cond_2BD):
        calls.append((si, tuple(x_2BlC.shape)))
        return scale_logits(var_, si, x_2BlC, cond_2BD_or_gss, cond_2BD)
    var.scale_logits = counting
    assert scale_pass_of(var) is counting
    assert_same(sample(var, 2, g_seed=3), want)
    assert calls == [(si, (4, pn * pn, var.C)) for si, pn in enumerate(var.patch_nums)]


@pytest.mark.parametrize('overrides', [{}, dict(shared_aln=True, attn_l2_norm=True)])
def test_static_pass_is_the_plain_pass(overrides):
    """Owned caches and static buffers, for two successive calls and two batch sizes (and the shared AdaLN, whose
    condition is a (2B, 1, 6, C) tensor), give the plain pass's logits, tokens and images; the caches keep their
    addresses across calls."""
    _, var = build_tiny(seed=6, **overrides)
    want = {(B, seed): sample(var, B, g_seed=seed) for B in (2, 3) for seed in (0, 1)}
    graphs = var.scale_logits = ScaleGraphs(capture=False)
    for (B, seed), w in want.items():
        assert_same(sample(var, B, g_seed=seed), w)
    assert graphs.sets_made == 2 and len(graphs.captured) == 2 and not any(graphs.captured.values())
    k_ptrs = [s.kv_per_block[0][0].data_ptr() for s in graphs._sets.values()]
    assert_same(sample(var, 3, g_seed=1), want[3, 1])
    assert graphs.sets_made == 2 and [s.kv_per_block[0][0].data_ptr() for s in graphs._sets.values()] == k_ptrs


@pytest.mark.parametrize('overrides', [{}, dict(shared_aln=True, attn_l2_norm=True)])
def test_static_pass_under_cpu_autocast(overrides):
    """bfloat16 autocast (its weight cache off in the static pass, as in a capture) gives the plain pass's numbers."""
    _, var = build_tiny(seed=6, **overrides)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        want = sample(var, 2, g_seed=4)
        var.scale_logits = ScaleGraphs(capture=False)
        assert_same(sample(var, 2, g_seed=4), want)
        assert_same(sample(var, 2, g_seed=4), want)
    assert [key[2] for key in var.scale_logits.captured] == [torch.bfloat16]


def test_static_pass_with_editing_hooks(models, plain_after):
    """Zero-shot editing (KeepInputTokens, the hooks path of edit.py) through the static pass."""
    vae, var = models
    input_idx = vae.img_to_idxBl(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    mask_hw = make_edit_mask((0.25, 0.0, 0.75, 0.5), 'inpaint', (4, 4))
    edit = dict(input_img_tokens=[t.expand(2, -1) for t in input_idx], edit_mask=mask_hw)
    want = sample(plain_after, 2, g_seed=[8, 9], **edit)
    var.scale_logits = ScaleGraphs(capture=False)
    assert_same(sample(var, 2, g_seed=[8, 9], **edit), want)


def test_moved_parameters_drop_the_sets():
    """load_state_dict(..., assign=True) gives the model new parameter tensors: the sets are made again; an in-place
    load keeps them, and the static pass reads the new values."""
    _, var = build_tiny(seed=7)
    graphs = var.scale_logits = ScaleGraphs(capture=False)
    first = sample(var, 2, g_seed=0)
    assert graphs.sets_made == 1
    var.load_state_dict(build_tiny(seed=8)[1].state_dict())    # copies into the same tensors
    loaded = sample(var, 2, g_seed=0)
    assert not torch.equal(loaded[0], first[0])
    assert_same(loaded, plain_sample(var, 2, g_seed=0))
    assert graphs.sets_made == 1
    var.load_state_dict({k: v.clone() for k, v in build_tiny(seed=9)[1].state_dict().items()}, assign=True)
    assigned = sample(var, 2, g_seed=0)
    assert graphs.sets_made == 2 and len(graphs.captured) == 1
    assert_same(assigned, plain_sample(var, 2, g_seed=0))


def test_use_cuda_graphs_on_the_cpu_falls_back_and_logs(models, plain_after, caplog):
    """On the CPU use_cuda_graphs leaves the plain pass, saying so in one line; a capturing pass given to a CPU model,
    and any pass in training mode, run the plain pass, logged once each; enabled=False removes a converter."""
    var = plain_after
    with caplog.at_level(logging.INFO, logger='utils.sampling_graphs'):
        assert use_cuda_graphs(var) is var
    lines = [r.getMessage() for r in caplog.records if r.name == 'utils.sampling_graphs']
    assert len(lines) == 1 and 'plain per-scale pass' in lines[0] and ('cpu' in lines[0] or 'CUDA is not available' in lines[0])
    assert scale_pass_of(var) is scale_logits

    want = sample(var, 2, g_seed=2)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='utils.sampling_graphs'):
        var.scale_logits = ScaleGraphs(capture=True)
        assert_same(sample(var, 2, g_seed=2), want)
        assert_same(sample(var, 2, g_seed=2), want)
        assert var.scale_logits.sets_made == 0
        var.scale_logits = ScaleGraphs(capture=False)
        var.train()
        try:
            sample(var, 2, g_seed=2)
            sample(var, 2, g_seed=2)
        finally:
            var.eval()
        assert var.scale_logits.sets_made == 0
    lines = [r.getMessage() for r in caplog.records if r.name == 'utils.sampling_graphs']
    assert len(lines) == 2 and 'on cpu' in lines[0] and 'training mode' in lines[1], lines

    assert use_cuda_graphs(var, enabled=False) is var and scale_pass_of(var) is scale_logits


def test_a_copy_of_the_model_gets_an_empty_pass(models, plain_after):
    """copy.deepcopy of a converted model works and starts with no sets of its own."""
    var = plain_after
    var.scale_logits = ScaleGraphs(capture=False)
    sample(var, 2, g_seed=0)
    twin = copy.deepcopy(var)
    assert isinstance(twin.scale_logits, ScaleGraphs) and twin.scale_logits is not var.scale_logits
    assert twin.scale_logits.sets_made == 0 and not twin.scale_logits.captured
    assert_same(sample(twin, 2, g_seed=1), sample(var, 2, g_seed=1))
