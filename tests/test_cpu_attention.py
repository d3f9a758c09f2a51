"""The converted transformer's CPU attention (cpu_kernels): teacher forcing by groups of scales and in one function from
the qkv layout gives the dense mask's logits and gradients; the one function keeps four activations and runs only where
it applies."""
import pytest
import torch

from conftest import build_tiny
from cpu_kernels import block_causal, convert, fast_paths
from models.attention import BlockCausal, attention, block_causal_groups
from test_attention import block_causal_bias


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
    vae, _ = build_tiny(patch_nums=(1, 2, 4, 8, 9))
    var = convert(VAR(vae, num_classes=5, depth=2, embed_dim=64, num_heads=4, attn_l2_norm=True, patch_nums=(1, 2, 4, 8, 9)))
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
        with fast_paths(False):
            b = var(labels, x[:, :84], prog_si=3)
    assert (a - b).abs().max() < 1e-5


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
    var = convert(VAR(vae, num_classes=5, depth=2, embed_dim=64, num_heads=4, attn_l2_norm=l2, patch_nums=(1, 2, 4, 8)))
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
