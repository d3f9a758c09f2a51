"""The 'flex' attention backend on the CPU: VAR's block-causal mask as a FlexAttention BlockMask gives what the 'math'
backend gives with the dense additive mask (attention outputs, VAR logits with and without the L2 norm, all scales
and a progressive prefix), the BlockMask is exactly VAR's and is built once per shape, torch.compile traces the blocks
with it without graph breaks, and everything flex cannot do goes to SDPA. PyTorch's CPU FlexAttention runs forward
only; its backward is checked on CUDA (tests/test_cuda_flex.py)."""
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny, cpu_kernels_importable
from models.attention import BACKENDS, BlockCausal, attention, backend_status, describe_backends, flex, flex_available
from test_attention import block_causal_bias

pytestmark = pytest.mark.skipif(not flex_available('cpu'), reason='this PyTorch has no torch.nn.attention.flex_attention')

PATCH_NUMS = (1, 2, 3, 4)   # conftest.TINY's scales: 30 tokens


def count_calls(monkeypatch, *names: str) -> dict:
    """Counts of calls of these functions of torch.nn.attention.flex_attention, as the flex backend calls them."""
    calls = dict.fromkeys(names, 0)
    api = flex._api()
    for name in names:
        original = getattr(api, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(api, name, counting)
    return calls


@pytest.fixture
def no_kept_masks():
    flex.clear_block_masks()
    yield
    flex.clear_block_masks()


@pytest.fixture
def counted(monkeypatch, no_kept_masks):
    """Counts of FlexAttention calls and BlockMask creations, from no kept masks."""
    return count_calls(monkeypatch, 'flex_attention', 'create_block_mask')


def qkv_BHLc(L: int, B: int = 2, H: int = 3, c: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, c, generator=g) for _ in range(3)]


def own_scale_only(bias: torch.Tensor) -> torch.Tensor:
    """From a block-causal mask, the mask in which each token reads only the tokens of its own scale."""
    L = bias.shape[-1]
    keep_LL = bias.reshape(L, L) == 0
    return torch.where(keep_LL & keep_LL.T, 0.0, -torch.inf)


def tiny_var(l2: bool, fast: bool = False):
    vae, var = build_tiny(fast=fast, attn_l2_norm=l2)
    var.cond_drop_rate = 0.0   # the forward drops labels like the reference's, also in eval
    g = torch.Generator().manual_seed(1)
    x_BLCv = torch.randn(3, var.L - var.first_l, var.Cvae, generator=g)
    return var, torch.tensor([0, 3, 4]), x_BLCv


@pytest.mark.parametrize('n_scales', [4, 3], ids=['all_scales', 'prefix'])
def test_block_mask_is_vars_block_causal_mask(n_scales):
    _, var = build_tiny()
    lengths = [pn * pn for pn in PATCH_NUMS[:n_scales]]
    L = sum(lengths)
    bias = var.attn_bias_for_masking[:, :, :L, :L]
    block_mask = flex.block_mask_over_scales(lengths, 'cpu')
    assert block_mask.shape == (1, 1, L, L)
    zero = torch.zeros((), dtype=torch.int64)
    q_idx, kv_idx = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep_LL = block_mask.mask_mod(zero, zero, q_idx, kv_idx)
    assert torch.equal(keep_LL, bias[0, 0] == 0)
    # the dense mask (additive or boolean) tells the same scales back; other masks are not block-causal over scales
    assert flex.scale_lengths_of_mask(bias, L) == tuple(lengths)
    assert flex.scale_lengths_of_mask(bias == 0, L) == tuple(lengths)
    causal = torch.where(torch.ones(L, L, dtype=torch.bool).tril(), 0.0, -torch.inf)
    assert flex.scale_lengths_of_mask(causal, L) == (1,) * L                  # causal: scales of one token
    assert flex.scale_lengths_of_mask(own_scale_only(bias), L) is None       # rows that do not read a prefix
    look_ahead = torch.where(torch.ones(L, L, dtype=torch.bool).tril(1), 0.0, -torch.inf)
    assert flex.scale_lengths_of_mask(look_ahead, L) is None                 # prefixes, but no scales
    assert flex.scale_lengths_of_mask(bias.clamp_min(-1.0), L) is None      # finite bias, not a mask
    assert flex.scale_lengths_of_mask(bias.expand(2, 1, L, L), L) is None   # one mask per batch row


@pytest.mark.parametrize('n_scales', [4, 3], ids=['all_scales', 'prefix'])
@pytest.mark.parametrize('mask', ['block_causal', 'dense_float', 'dense_bool'])
def test_flex_attention_equals_the_additive_mask(counted, mask, n_scales):
    patch_nums = PATCH_NUMS[:n_scales]
    lengths = [pn * pn for pn in patch_nums]
    q, k, v = qkv_BHLc(sum(lengths))
    bias = block_causal_bias(patch_nums, as_bool=False)
    attn_bias = {'block_causal': BlockCausal.over_scales(lengths, bias, flex_mask=True), 'dense_float': bias,
                 'dense_bool': block_causal_bias(patch_nums, as_bool=True)}[mask]
    got = attention(q, k, v, scale=0.3, attn_bias=attn_bias, backend='flex')
    want = attention(q, k, v, scale=0.3, attn_bias=bias, backend='math')
    assert counted['flex_attention'] == 1
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize('prog_si', [-1, 2], ids=['all_scales', 'progressive'])
@pytest.mark.parametrize('l2', [True, False], ids=['l2_norm', 'no_l2_norm'])
def test_var_forward_with_flex_equals_math(counted, l2, prog_si):
    var, labels, x_BLCv = tiny_var(l2)
    L = var.L if prog_si < 0 else var.begin_ends[prog_si][1]
    x_BLCv = x_BLCv[:, :L - var.first_l]
    with torch.no_grad():
        var.set_attn_backend('math')
        want_BLV = var(labels, x_BLCv, prog_si=prog_si)
        var.set_attn_backend('flex')
        got_BLV = var(labels, x_BLCv, prog_si=prog_si)
    assert counted['flex_attention'] == var.depth   # every block attended through FlexAttention
    assert got_BLV.shape == (3, L, var.V) and (got_BLV - want_BLV).abs().max().item() < 1e-5


def test_block_mask_is_built_once_per_shape(counted):
    var, labels, x_BLCv = tiny_var(True)
    var.set_attn_backend('flex')
    with torch.no_grad():
        for _ in range(3):
            var(labels, x_BLCv)
        assert counted['create_block_mask'] == 1 and flex.cached_block_masks() == 1
        for _ in range(2):   # a progressive stage: the scales of its prefix, one more mask
            var(labels, x_BLCv[:, :13], prog_si=2)
        q, k, v = qkv_BHLc(var.L)
        attention(q, k, v, 0.3, var.attn_bias_for_masking, backend='flex')   # the dense mask of the same scales
    assert counted['create_block_mask'] == 2 and flex.cached_block_masks() == 2
    assert counted['flex_attention'] == 5 * var.depth + 1


def test_flex_falls_back_to_sdpa_where_it_does_not_apply(counted):
    lengths = [pn * pn for pn in PATCH_NUMS]
    L = sum(lengths)
    q, k, v = qkv_BHLc(L)
    bias = block_causal_bias(PATCH_NUMS, as_bool=False)
    mask = BlockCausal.over_scales(lengths, bias, flex_mask=True)
    sdpa = attention(q, k, v, 0.3, None, backend='sdpa')
    assert torch.equal(attention(q, k, v, 0.3, None, backend='flex'), sdpa)             # unmasked: KV-cached sampling
    q_last = q[:, :, -16:]
    assert torch.equal(attention(q_last, k, v, 0.3, None, backend='flex'), attention(q_last, k, v, 0.3, None, backend='sdpa'))
    own = own_scale_only(bias)   # not block-causal over scales
    assert torch.equal(attention(q, k, v, 0.3, own, backend='flex'), attention(q, k, v, 0.3, own, backend='sdpa'))
    torch.manual_seed(0)
    with_dropout = attention(q, k, v, 0.3, mask, dropout_p=0.5, backend='flex')           # FlexAttention has no dropout
    torch.manual_seed(0)
    assert torch.equal(with_dropout, attention(q, k, v, 0.3, mask, dropout_p=0.5, backend='sdpa'))
    qg = q.clone().requires_grad_()   # the CPU FlexAttention has no backward: autograd on the CPU goes to SDPA
    out = attention(qg, k, v, 0.3, mask, backend='flex')
    out.sum().backward()
    assert torch.equal(out, attention(q, k, v, 0.3, mask, backend='sdpa')) and qg.grad is not None
    assert counted['flex_attention'] == 0


@pytest.mark.parametrize('l2', [True, False], ids=['l2_norm', 'no_l2_norm'])
def test_cpu_training_step_with_flex_equals_the_default(counted, l2):
    """CPU training asks for a backward, which the CPU FlexAttention has not: 'flex' attends as 'sdpa' does, with the
    same logits and gradients, bit for bit."""
    var, labels, x_BLCv = tiny_var(l2)
    var.train()
    outs = {}
    for backend in ('sdpa', 'flex'):
        var.set_attn_backend(backend)
        var.zero_grad(set_to_none=True)
        torch.manual_seed(0)   # the same drop-path draws
        logits_BLV = var(labels, x_BLCv)
        logits_BLV.square().mean().backward()
        outs[backend] = logits_BLV.detach(), {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}
    assert counted['flex_attention'] == 0
    assert torch.equal(outs['flex'][0], outs['sdpa'][0])
    assert outs['flex'][1].keys() == outs['sdpa'][1].keys()
    assert all(torch.equal(outs['flex'][1][n], outs['sdpa'][1][n]) for n in outs['sdpa'][1])


@pytest.mark.skipif(not cpu_kernels_importable(), reason='cpu_kernels is not importable here')
def test_converted_model_attends_through_flex_in_inference_and_by_its_cpu_kernels_in_training(counted):
    """A model converted by cpu_kernels: inference on 'flex' goes through FlexAttention (the math backend's logits),
    training through the CPU kernels as on 'sdpa' (the same logits and gradients, bit for bit)."""
    var, labels, x_BLCv = tiny_var(True, fast=True)
    with torch.no_grad():
        var.set_attn_backend('math')
        want_BLV = var(labels, x_BLCv)
        var.set_attn_backend('flex')
        got_BLV = var(labels, x_BLCv)
    assert counted['flex_attention'] == var.depth and (got_BLV - want_BLV).abs().max().item() < 1e-5
    var.train()
    outs = {}
    for backend in ('sdpa', 'flex'):
        var.set_attn_backend(backend)
        var.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        logits_BLV = var(labels, x_BLCv)
        logits_BLV.square().mean().backward()
        outs[backend] = logits_BLV.detach(), {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}
    assert counted['flex_attention'] == var.depth
    assert torch.equal(outs['flex'][0], outs['sdpa'][0])
    assert all(torch.equal(outs['flex'][1][n], outs['sdpa'][1][n]) for n in outs['sdpa'][1])


def test_compiled_blocks_attend_through_flex_without_graph_breaks(monkeypatch, no_kept_masks):
    """Each block compiled with fullgraph=True (a graph break would be an error) runs FlexAttention inside its graph,
    with the BlockMask that VAR.forward made outside it, and gives the math backend's logits; another step with a
    fresh BlockCausal (the same BlockMask) compiles nothing new."""
    counted = count_calls(monkeypatch, 'create_block_mask')   # not flex_attention: a counter in the graph is guarded on
    var, labels, x_BLCv = tiny_var(True)
    graphs = []

    def recording_backend(gm, example_inputs):   # runs the captured graph as it is, keeping its text
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            var.set_attn_backend('math')
            want_BLV = var(labels, x_BLCv)
            want_prog_BLV = var(labels, x_BLCv[:, :13], prog_si=2)
            var.set_attn_backend('flex')
            for b in var.blocks:
                b.compile(fullgraph=True, dynamic=False, backend=recording_backend)
            got_BLV = var(labels, x_BLCv)
            with torch._dynamo.config.patch(error_on_recompile=True):   # a fresh BlockCausal, the same BlockMask
                again_BLV = var(labels, x_BLCv)
            got_prog_BLV = var(labels, x_BLCv[:, :13], prog_si=2)
    finally:
        torch._dynamo.reset()
    assert graphs and all('flex_attention' in g and 'scaled_dot_product_attention' not in g for g in graphs)
    assert 'create_block_mask' not in ''.join(graphs) and counted['create_block_mask'] == 2   # made eagerly, once per shape
    assert (got_BLV - want_BLV).abs().max().item() < 1e-5 and torch.equal(again_BLV, got_BLV)
    assert (got_prog_BLV - want_prog_BLV).abs().max().item() < 1e-5


def test_inductor_compiles_cpu_flex_forward_with_mixed_layouts(counted):
    """inductor's C++ FlexAttention (PyTorch 2.14) went wrong when q and k came fresh from the L2 norm and v as a strided
    view of qkv, as SelfAttention makes them (errors of order one); the flex backend hands it one layout."""
    lengths = [pn * pn for pn in PATCH_NUMS]
    B, L, H, c = 2, sum(lengths), 2, 16
    qkv_BL3Hc = torch.randn(B, L, 3, H, c, generator=torch.Generator().manual_seed(0))
    bias = block_causal_bias(PATCH_NUMS, as_bool=False)
    mask = BlockCausal.over_scales(lengths, bias, flex_mask=True)

    def l2_attention(qkv_BL3Hc, attn_bias, backend):
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(dim=0)
        q_BHLc, k_BHLc = F.normalize(q_BHLc, dim=-1) * 4.0, F.normalize(k_BHLc, dim=-1)
        return attention(q_BHLc, k_BHLc, v_BHLc, 1.0, attn_bias, backend=backend)

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            got = torch.compile(l2_attention, fullgraph=True, dynamic=False)(qkv_BL3Hc, mask, 'flex')
    finally:
        torch._dynamo.reset()
    want = l2_attention(qkv_BL3Hc, bias, 'math')
    assert (got - want).abs().max().item() < 1e-5


def test_flex_backend_is_accepted_described_and_logged(counted, caplog, monkeypatch):
    assert 'flex' in BACKENDS
    var, labels, x_BLCv = tiny_var(True)
    with caplog.at_level(logging.INFO):
        var.set_attn_backend('flex')
    assert var.attn_backend == 'flex' and all(b.attn.backend == 'flex' for b in var.blocks)
    lines = [r.getMessage() for r in caplog.records if 'attention backend flex' in r.getMessage()]
    assert len(lines) == 1 and 'FlexAttention' in lines[0] and 'torch.compile' in lines[0]
    assert 'FlexAttention' in describe_backends('flex')
    usable, why_not = backend_status('flex')
    assert usable == flex_available('cuda') and (usable or 'CUDA' in why_not)
    monkeypatch.setattr(flex, '_NOTED_EAGER', False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='models.flex_attention'), torch.no_grad():
        var(labels, x_BLCv)
        var(labels, x_BLCv)
    eager_notes = [r for r in caplog.records if 'running eagerly' in r.getMessage()]
    assert len(eager_notes) == 1 and counted['flex_attention'] == 2 * var.depth
