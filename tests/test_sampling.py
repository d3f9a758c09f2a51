"""models/sampling.py: the loop with its default pieces is `autoregressive_infer_cfg`, and a guidance schedule, a token
sampler and a per-scale hook given to it are what it uses at every scale (the golden file pins the numbers: test_golden.py).
"""
import dataclasses
import re
import textwrap

import pytest
import torch

import models.sampling as sampling
from conftest import build_tiny
from models import make_edit_mask
from models.sampling import (GumbelSmoothing, KeepInputTokens, LinearGuidance, ScaleDraw, TokenDraw, TopKTopP, generators,
                             sample_next_scale, uniform_labels)


@pytest.fixture(scope='module')
def models():
    return build_tiny(seed=3)


class Recorder:
    """A hook that keeps a copy of every scale's draw as the loop passes it on."""

    def __init__(self):
        self.draws = []

    def __call__(self, draw: ScaleDraw) -> ScaleDraw:
        self.draws.append(dataclasses.replace(draw, **{f.name: getattr(draw, f.name).clone() for f in dataclasses.fields(draw)
                                                       if isinstance(getattr(draw, f.name), torch.Tensor)}))
        return draw


def decode(vae, idx_per_scale):
    """Images (B, 3, H, W) in [0, 1] the tokenizer makes from one token map per scale."""
    return vae.idxBl_to_img(idx_per_scale, same_shape=True, last_one=True).add(1).mul(0.5)


@pytest.mark.parametrize('B, label, g_seed, cfg, top_k, top_p, more_smooth', [
    (3, [0, 4, 2], 0, 1.5, 0, 0.0, False),
    (3, [1, 1, 3], 7, 4.0, 20, 0.9, False),
    (2, None, 5, 2.5, 0, 0.96, True),
    (2, 5, [11, 12], 3.0, 64, 1.0, False),
    (3, None, [3, 4, 5], 0.0, 5, 0.0, True),
])
def test_default_pieces_are_autoregressive_infer_cfg(models, B, label, g_seed, cfg, top_k, top_p, more_smooth):
    """The wrapper and the loop called with explicitly built pieces give the same images and tokens, bit for bit."""
    vae, var = models
    seen = []
    img = var.autoregressive_infer_cfg(B=B, label_B=label, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                       more_smooth=more_smooth, on_scale=lambda si, logits_2BlV, idx_Bl: seen.append(idx_Bl.clone()))
    rng = generators(g_seed, B, var)
    label_B = uniform_labels(var.num_classes, B, rng, 'cpu') if label is None else torch.as_tensor(label).expand(B).clone()
    sampler = TopKTopP(top_k=top_k, top_p=top_p)
    rec = Recorder()
    again = sample_next_scale(var, label_B, rng, guidance=LinearGuidance(cfg),
                              sampler=GumbelSmoothing(sampler) if more_smooth else sampler, hooks=[rec])
    assert torch.equal(img, again)
    assert len(seen) == len(rec.draws) == len(var.patch_nums)
    assert all(torch.equal(a, d.idx_Bl) for a, d in zip(seen, rec.draws))
    assert [d.ratio for d in rec.draws] == [si / (len(var.patch_nums) - 1) for si in range(len(var.patch_nums))]
    if not more_smooth:     # the image is the tokenizer's decoding of the drawn tokens
        assert (decode(vae, [d.idx_Bl for d in rec.draws]) - img).abs().max() < 1e-5
    else:                   # smoothing passes a mix of codebook rows on, not the drawn ones
        assert not torch.equal(rec.draws[-1].h_BlCv, vae.quantize.embedding(rec.draws[-1].idx_Bl))


def test_a_custom_guidance_schedule_is_honoured(models):
    """The logits the sampler draws from are (1 + t) cond - t uncond with t what the schedule says at that scale."""
    _, var = models
    weights = [0.5, -1.0, 3.0, 7.25]
    asked = []

    def per_scale_guidance(*, si, ratio):
        asked.append((si, ratio))
        return weights[si]

    guided = []

    def recording_sampler(logits_BlV, *, si, ratio, rng):
        guided.append(logits_BlV.clone())
        return TopKTopP(top_k=10)(logits_BlV, si=si, ratio=ratio, rng=rng)

    rec = Recorder()
    label_B = torch.tensor([0, 3])
    img = sample_next_scale(var, label_B, generators(1, 2, var), guidance=per_scale_guidance, sampler=recording_sampler, hooks=[rec])
    assert asked == [(si, si / 3) for si in range(4)]
    for si, (d, logits_BlV) in enumerate(zip(rec.draws, guided)):
        t = weights[si]
        assert torch.equal(logits_BlV, (1 + t) * d.logits_2BlV[:2] - t * d.logits_2BlV[2:]), f'scale {si}'
    linear = sample_next_scale(var, label_B, generators(1, 2, var), guidance=LinearGuidance(1.5), sampler=TopKTopP(top_k=10))
    assert (img - linear).abs().max() > 0.05, 'another schedule gives other images'


def test_a_custom_token_sampler_is_used_at_every_scale(models):
    """An argmax sampler draws every scale's tokens: the image is their decoding, and no seed changes it."""
    vae, var = models
    called = []

    def argmax(logits_BlV, *, si, ratio, rng):
        called.append(si)
        return TokenDraw(logits_BlV.argmax(dim=-1))

    label_B = torch.tensor([2, 4, 1])
    rec = Recorder()
    img = sample_next_scale(var, label_B, generators(0, 3, var), guidance=LinearGuidance(2.0), sampler=argmax, hooks=[rec])
    assert called == list(range(len(var.patch_nums)))
    for d in rec.draws:
        assert torch.equal(d.idx_Bl, d.logits_BlV.argmax(dim=-1))
        assert torch.equal(d.h_BlCv, vae.quantize.embedding(d.idx_Bl))
    assert (decode(vae, [d.idx_Bl for d in rec.draws]) - img).abs().max() < 1e-5
    assert torch.equal(img, sample_next_scale(var, label_B, generators(99, 3, var), guidance=LinearGuidance(2.0), sampler=argmax))
    sampled = sample_next_scale(var, label_B, generators(0, 3, var), guidance=LinearGuidance(2.0))
    assert (img - sampled).abs().max() > 0.05


@pytest.mark.parametrize('more_smooth', [False, True])
def test_the_edit_hook_keeps_the_input_tokens_at_every_scale(models, more_smooth):
    vae, var = models
    B = 2
    input_idx = vae.img_to_idxBl(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    mask_hw = make_edit_mask((0.25, 0.0, 0.75, 0.5), 'inpaint', (4, 4))
    edit = KeepInputTokens.from_mask(input_idx, mask_hw, var.patch_nums, B, vae.quantize.embedding)
    drawn, kept = Recorder(), Recorder()
    sampler = GumbelSmoothing(TopKTopP(top_k=30)) if more_smooth else TopKTopP(top_k=30)
    img = sample_next_scale(var, torch.tensor([1, 2]), generators([4, 5], B, var), guidance=LinearGuidance(3.0),
                            sampler=sampler, hooks=[drawn, edit, kept])
    n_kept = n_drawn = 0
    for si, (before, after, input_1l, keep_Bl1) in enumerate(zip(drawn.draws, kept.draws, input_idx, edit.keep_Bl1)):
        keep_Bl = keep_Bl1[:, :, 0].expand(B, -1)
        assert torch.equal(after.idx_Bl[keep_Bl], input_1l.expand(B, -1)[keep_Bl]), f'scale {si}: a kept token changed'
        assert torch.equal(after.idx_Bl[~keep_Bl], before.idx_Bl[~keep_Bl]), f'scale {si}: a drawn token changed'
        assert torch.equal(after.h_BlCv[keep_Bl], vae.quantize.embedding(input_1l).expand(B, -1, -1)[keep_Bl])
        assert torch.equal(after.h_BlCv[~keep_Bl], before.h_BlCv[~keep_Bl])
        n_kept, n_drawn = n_kept + int(keep_Bl.sum()), n_drawn + int((~keep_Bl).sum())
    assert n_kept > 0 and n_drawn > 0
    assert (before.idx_Bl != after.idx_Bl).any(), 'the hook had something to rewrite'
    if not more_smooth:
        assert (decode(vae, [d.idx_Bl for d in kept.draws]) - img).abs().max() < 1e-5, 'the loop goes on from the hook\'s tokens'
    wrapper = var.autoregressive_infer_cfg(B=B, label_B=[1, 2], g_seed=[4, 5], cfg=3.0, top_k=30, more_smooth=more_smooth,
                                           input_img_tokens=input_idx, edit_mask=mask_hw)
    assert torch.equal(img, wrapper), 'editing in autoregressive_infer_cfg is this hook'


def test_pieces_that_break_the_contract_are_named(models):
    _, var = models
    label_B = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r'token sampler .* drew ids of shape \(2, 1, 1\) .* expected integer ids of shape \(2, 1\)'):
        sample_next_scale(var, label_B, sampler=lambda logits_BlV, **kw: TokenDraw(logits_BlV.argmax(-1, keepdim=True)))
    with pytest.raises(TypeError, match=r'token sampler .* returned Tensor, not a TokenDraw'):
        sample_next_scale(var, label_B, sampler=lambda logits_BlV, **kw: logits_BlV.argmax(-1))
    with pytest.raises(TypeError, match=r'scale hook .* returned NoneType, not a ScaleDraw'):
        sample_next_scale(var, label_B, hooks=[lambda draw: None])
    assert all(b.attn.cached_k is None and not b.attn.caching for b in var.blocks), 'the KV cache is cleared after an error'
    for bad in ([0, 1], torch.tensor([0, 6]), torch.tensor([-1, 0]), torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]])):
        with pytest.raises(ValueError, match=r'label_B must be a 1-D integer tensor of labels in \[0, 5\]'):
            sample_next_scale(var, bad)


def test_the_module_docstring_example_runs():
    _, var = build_tiny(V=1024)     # the example's top_k=900 needs a vocabulary that large
    code = textwrap.dedent(re.search(r'few lines:\n\n(.*?)\n\n[A-Z]', sampling.__doc__, re.S).group(1))
    scope = {'var': var}
    exec(compile(code, 'models/sampling.py docstring', 'exec'), scope)
    assert scope['img_B3HW'].shape == scope['greedy_B3HW'].shape == (4, 3, 64, 64)
    want = var.autoregressive_infer_cfg(B=4, label_B=[1, 2, 3, 4], g_seed=0, cfg=2.0, top_k=900, top_p=0.96)
    assert not torch.equal(scope['img_B3HW'], want), 'a constant schedule is not the linear ramp'


def test_kv_cache_is_allocated_once_and_samples_what_a_growing_cache_samples(models, monkeypatch):
    """The loop's KV cache holds all var.L tokens from its first scale on (every scale writes into the same storage,
    none copies the cache so far) and samples the very images a cache grown by concatenation (the reference's) does;
    freed afterwards, and more tokens than its capacity is an error."""
    _, var = models
    storages = []
    record = Recorder()

    def note_storage(draw):
        storages.append({b.attn.cached_k.untyped_storage().data_ptr() for b in var.blocks})
        return record(draw)

    img = sample_next_scale(var, torch.tensor([0, 3]), rng=generators(1, 2, var), hooks=[note_storage])
    assert len(storages) == len(var.patch_nums) and all(s == storages[0] for s in storages)
    assert all(b.attn.cached_k is None and b.attn._kv_buffers is None for b in var.blocks)
    grown = []
    real_kv_caching = type(var.blocks[0].attn).kv_caching
    monkeypatch.setattr(type(var.blocks[0].attn), 'kv_caching', lambda self, enable, capacity=0: grown.append(1) or real_kv_caching(self, enable))
    assert torch.equal(sample_next_scale(var, torch.tensor([0, 3]), rng=generators(1, 2, var)), img) and grown
    monkeypatch.undo()
    attn = var.blocks[0].attn
    attn.kv_caching(True, capacity=3)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match='the KV cache holds 3 tokens and 4 were fed'):
            attn(torch.randn(2, 4, var.C), attn_bias=None)
    finally:
        attn.kv_caching(False)


def test_the_raw_logits_are_freed_before_the_sampler_runs_unless_a_hook_reads_them(models, monkeypatch):
    """The doubled batch's raw logits (2B, l, V) are not alive while the sampler makes its V-wide temporaries (the
    reference frees them there too), unless a hook needs them: they made this code's sampling peak the higher one."""
    import weakref
    vae, var = models
    raw = []
    real_get_logits = type(var).get_logits
    monkeypatch.setattr(var, 'get_logits', lambda *a, **k: raw.append(weakref.ref(out := real_get_logits(var, *a, **k))) or out)
    alive = []

    def argmax(logits_BlV, *, si, ratio, rng):
        alive.append(raw[-1]() is not None)
        return TokenDraw(logits_BlV.argmax(dim=-1))

    label_B = torch.tensor([2, 4])
    with torch.no_grad():
        plain = sample_next_scale(var, label_B, generators(0, 2, var), sampler=argmax)
        assert alive and not any(alive)
        alive.clear()
        hooked = sample_next_scale(var, label_B, generators(0, 2, var), sampler=argmax, hooks=[Recorder()])
        assert alive and all(alive)
    assert torch.equal(plain, hooked)
