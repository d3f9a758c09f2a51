"""Attention paths agree with a plain matmul-softmax reference; KV-cached sampling agrees with teacher forcing."""
import logging

import pytest
import torch

from conftest import build_tiny
from models.kernels import BACKENDS, BlockCausal, attention, backend_status, block_causal, block_causal_groups, choose_backend, fast_paths
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


@pytest.mark.parametrize('cfg', [0.0, 2.5])
@pytest.mark.parametrize('shared_aln', [False, True])
def test_kv_cached_sampling_matches_teacher_forcing(cfg, shared_aln):
    vae, var = build_tiny(shared_aln=shared_aln)
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


def logits_and_grads_fast_and_plain(var, labels, x):
    """{fast: (logits, {parameter name: gradient})} of one forward + backward of `var` with the fast paths on (True) and
    off (False); the switch is restored afterwards."""
    outs = {}
    for fast in (True, False):
        with fast_paths(fast):
            var.zero_grad()
            logits = var(labels, x)
            logits.square().mean().backward()
        outs[fast] = (logits.detach(), {n: p.grad.clone() for n, p in var.named_parameters()})
    return outs


def test_grouped_block_causal_attention_equals_the_dense_mask():
    """Teacher forcing by groups of scales gives the dense-mask logits and gradients."""
    from models import VAR
    from models.kernels import block_causal_groups
    vae, _ = build_tiny(patch_nums=(1, 2, 4, 8, 9))
    var = VAR(vae, num_classes=5, depth=2, embed_dim=64, num_heads=4, attn_l2_norm=True, patch_nums=(1, 2, 4, 8, 9))
    var.init_weights(init_adaln_gamma=1.0, init_head=1.0)
    var.cond_drop_rate = 0.0
    assert block_causal_groups([1, 4, 16, 64, 81]) == ((0, 21, 21, True), (21, 85, 85, False), (85, 166, 166, False))
    x = torch.randn(3, var.L - 1, var.Cvae)
    labels = torch.tensor([0, 3, 4])
    outs = logits_and_grads_fast_and_plain(var, labels, x)
    assert (outs[True][0] - outs[False][0]).abs().max() < 1e-5
    assert all((outs[True][1][n] - outs[False][1][n]).abs().max() < 1e-5 for n in outs[True][1])
    with torch.no_grad():   # progressive training: groups over the first scales only
        a = var(labels, x[:, :84], prog_si=3)
        var.set_fast_paths(False)
        b = var(labels, x[:, :84], prog_si=3)
    assert (a - b).abs().max() < 1e-5


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


def plain_self_attention(qkv_BL3Hc, scale_mul_1H11, scale, bias):
    """SelfAttention's plain path in float64: heads split, F.normalize, the dense mask, heads merged."""
    B, L = qkv_BL3Hc.shape[:2]
    q, k, v = qkv_BL3Hc.double().permute(2, 0, 3, 1, 4).unbind(dim=0)
    if scale_mul_1H11 is not None:
        q = torch.nn.functional.normalize(q, dim=-1).mul(scale_mul_1H11.double())
        k = torch.nn.functional.normalize(k, dim=-1)
    return attention(q, k, v, scale, bias.double(), backend='math').transpose(1, 2).reshape(B, L, -1)


@pytest.mark.parametrize('l2', [True, False])
@pytest.mark.parametrize('patch_nums', [(1, 2, 4, 8, 9), (8, 9), (1, 2, 3)])   # masked + unmasked groups, unmasked only, masked only
def test_fused_block_causal_self_attention_equals_the_dense_mask(patch_nums, l2):
    """The one-function CPU path (L2 norm, attention by groups, heads merged) gives the plain path's output and the
    gradients of qkv and of the learned q scale, within float32 rounding."""
    torch.manual_seed(0)
    lengths = [pn * pn for pn in patch_nums]
    B, L, H, c = 2, sum(lengths), 3, 16
    groups = block_causal_groups(lengths)
    assert any(g[3] for g in groups) == (patch_nums[0] == 1) and any(not g[3] for g in groups) == (patch_nums[-1] >= 8)
    mask = BlockCausal(groups, block_causal_bias(patch_nums, as_bool=False))
    qkv = (torch.randn(B, L, 3, H, c) * 2).requires_grad_()
    scale_mul = (torch.randn(1, H, 1, 1) * 0.3 + 1.4).exp().requires_grad_() if l2 else None
    scale = 1.0 if l2 else 0.25 / c ** 0.5
    assert block_causal.applies(qkv, mask, 0.0, 'sdpa')
    assert_fused_equals_plain(qkv, scale_mul, scale, mask)


def assert_fused_equals_plain(qkv, scale_mul, scale: float, mask: BlockCausal) -> None:
    """block_causal_self_attention's output and the gradients of qkv and of the q scale (when given) equal the plain
    path's in float64 within float32 rounding; a gradient with stride 0 (from .sum()) is taken as well."""
    B, L, _, H, c = qkv.shape
    w = torch.randn(B, L, H * c)
    got = block_causal.block_causal_self_attention(qkv, scale_mul, scale, mask)
    (got * w).sum().backward()
    leaves = [qkv] + ([scale_mul] if scale_mul is not None else [])
    got_grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    want = plain_self_attention(qkv, scale_mul, scale, mask.bias)
    (want * w.double()).sum().backward()
    assert got.shape == (B, L, H * c) and got.dtype == torch.float32
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    for name, g, t in zip(('qkv', 'scale_mul'), got_grads, leaves):
        assert (g - t.grad).abs().max() < 1e-5 * t.grad.abs().max(), name
    qkv.grad = None
    block_causal.block_causal_self_attention(qkv, scale_mul, scale, mask).sum().backward()
    want_sum = torch.autograd.grad(plain_self_attention(qkv, scale_mul, scale, mask.bias).sum(), qkv)[0]
    assert (qkv.grad - want_sum).abs().max() < 1e-5 * want_sum.abs().max()


@pytest.mark.parametrize('l2', [True, False])
def test_fused_block_causal_self_attention_keeps_four_activations_for_the_backward(l2):
    """Between forward and backward the function holds four (B, L, C) activations and per-row statistics: q, k and v
    as the attention read them (qkv itself without the L2 norm; with it the normalised q and k and a copy of v, and
    the raw qkv is let go) and its output. Keeping qkv as well as the normalised q and k was six."""
    torch.manual_seed(0)
    patch_nums = (1, 2, 4, 8)
    lengths = [pn * pn for pn in patch_nums]
    B, L, H, c = 2, sum(lengths), 4, 16
    mask = BlockCausal(block_causal_groups(lengths), block_causal_bias(patch_nums, as_bool=False))
    qkv = torch.randn(B, L, 3, H, c, requires_grad=True)
    scale_mul = torch.full((1, H, 1, 1), 2.0, requires_grad=True) if l2 else None
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block_causal.block_causal_self_attention(qkv, scale_mul, 1.0, mask)
    activation = B * L * H * c * 4
    assert out.untyped_storage().data_ptr() in kept
    assert (qkv.untyped_storage().data_ptr() in kept) != l2
    assert 4 * activation <= sum(kept.values()) < 4.25 * activation, (sum(kept.values()) / activation)   # + norms, log-sum-exps
    out.sum().backward()   # and the backward runs from what was kept
    assert qkv.grad is not None and qkv.grad.isfinite().all()


def test_fused_block_causal_self_attention_runs_only_where_it_applies():
    lengths = [1, 4, 64]
    L = sum(lengths)
    mask = BlockCausal(block_causal_groups(lengths), block_causal_bias((1, 2, 8), as_bool=False))
    qkv = torch.zeros(2, L, 3, 2, 8)
    assert block_causal.applies(qkv, mask, 0.0, 'sdpa')
    assert not block_causal.applies(qkv, mask.bias, 0.0, 'sdpa')          # a dense mask, not by groups
    assert not block_causal.applies(qkv, mask, 0.1, 'sdpa')               # dropout inside attention: the plain path
    assert not block_causal.applies(qkv, mask, 0.0, 'math')
    assert not block_causal.applies(qkv.double(), mask, 0.0, 'sdpa')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not block_causal.applies(qkv, mask, 0.0, 'sdpa')
    with fast_paths(False):
        assert not block_causal.applies(qkv, mask, 0.0, 'sdpa')
    with pytest.raises(ValueError, match='do not tile the 69 tokens'):   # groups that would leave output rows unwritten
        block_causal.block_causal_self_attention(qkv, None, 0.1, BlockCausal(((0, 5, 5, True),), mask.bias))


@pytest.mark.parametrize('l2', [True, False])
def test_training_step_with_fast_paths_equals_the_plain_path(l2, monkeypatch):
    """A VAR forward + backward in training mode: every block takes the fused CPU attention with the fast paths on, and
    the logits and every parameter's gradient equal those of the plain path (fast paths off)."""
    from models import VAR
    vae, _ = build_tiny(patch_nums=(1, 2, 4, 8))
    var = VAR(vae, num_classes=5, depth=2, embed_dim=64, num_heads=4, attn_l2_norm=l2, patch_nums=(1, 2, 4, 8))
    var.init_weights(init_adaln_gamma=1.0, init_head=1.0)
    var.train()
    var.cond_drop_rate = 0.0
    calls = []
    real = block_causal.block_causal_self_attention
    monkeypatch.setattr(block_causal, 'block_causal_self_attention', lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, var.L - 1, var.Cvae)
    labels = torch.tensor([0, 3, 4])
    outs = logits_and_grads_fast_and_plain(var, labels, x)
    assert len(calls) == len(var.blocks)   # with the fast paths on only
    assert (outs[True][0] - outs[False][0]).abs().max() < 1e-5
    for n, g in outs[True][1].items():
        assert (g - outs[False][1][n]).abs().max() <= 1e-5 * max(1.0, outs[False][1][n].abs().max().item()), n
