"""The 'flex' attention backend on CUDA, compiled by inductor (fullgraph=True): FlexAttention with VAR's block-causal
BlockMask against the dense additive mask, forward and backward (PyTorch's FlexAttention has its backward on CUDA only).

Kernel level: q and k fresh from the L2 norm (times a per-head scale) and v a strided view of qkv, as SelfAttention
makes them; output and the gradients of qkv and of the scale against a float64 matmul-softmax with the additive mask,
within test_cuda_attention's tolerances (float32 with TensorFloat32 off: 5e-5; bfloat16: 3e-2, in units of max(1,
max |reference|), gradients of their largest value). The BlockMask is built once for all the calls.
Model level: a tiny VAR without the L2 norm (q, k and v all strided views of qkv) whose blocks are compiled with the
'flex' backend against the same weights eagerly on 'math' (the dense mask) in float32: logits and every parameter's
gradient within test_cuda_attention's float32 bounds, one BlockMask over three steps, FlexAttention in every graph.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

from cuda_util import CUDA_MARKS, DEVICE, ieee_fp32, max_rel_err, tiny_on_cuda
from models.attention import BlockCausal, attention, backend_status, flex
from test_attention import block_causal_bias

pytestmark = CUDA_MARKS

PATCH_NUMS = (1, 2, 3, 4, 5)    # 55 tokens: not a multiple of FlexAttention's 128-token blocks, as the real 680 is not
LENGTHS = tuple(pn * pn for pn in PATCH_NUMS)
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}
KERNEL_TOL = {torch.float32: 5e-5, torch.bfloat16: 3e-2}   # test_cuda_attention's


@pytest.fixture
def flex_on_cuda(monkeypatch):
    """Skips without a usable 'flex' backend; counts BlockMask creations from no kept masks; a fresh torch._dynamo."""
    usable, why_not = backend_status('flex')
    if not usable:
        pytest.skip(f"attention backend 'flex': {why_not}")
    api, created = flex._api(), []
    original = api.create_block_mask
    monkeypatch.setattr(api, 'create_block_mask', lambda *a, **kw: created.append(1) or original(*a, **kw))
    flex.clear_block_masks()
    torch._dynamo.reset()
    yield created
    torch._dynamo.reset()
    flex.clear_block_masks()


def recording_inductor(graphs):
    """inductor, keeping the text of each graph it compiles."""
    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return compile_fx(gm, example_inputs)
    return backend


def l2_attention(qkv_BL3Hc, scale_mul_1H11, attn_bias, backend):
    """SelfAttention's attention with attn_l2_norm=True, heads merged: (B, L, 3, H, c) → (B, L, H·c)."""
    B, L = qkv_BL3Hc.shape[:2]
    q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(dim=0)
    q_BHLc, k_BHLc = F.normalize(q_BHLc, dim=-1).mul(scale_mul_1H11), F.normalize(k_BHLc, dim=-1)
    return attention(q_BHLc, k_BHLc, v_BHLc, 1.0, attn_bias, backend=backend).transpose(1, 2).reshape(B, L, -1)


@pytest.mark.parametrize('dtype', DTYPES)
def test_compiled_flex_forward_and_backward_match_the_additive_mask(flex_on_cuda, dtype):
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    B, L, H, c = 2, sum(LENGTHS), 4, 64
    qkv = (torch.randn(B, L, 3, H, c, generator=g) * 2).to(DEVICE, dt).requires_grad_()
    scale_mul = (torch.randn(1, H, 1, 1, generator=g) * 0.3 + 1.4).exp().to(DEVICE, dt).requires_grad_()
    bias = block_causal_bias(PATCH_NUMS, as_bool=False).to(DEVICE)
    grad_out = torch.randn(B, L, H * c, generator=torch.Generator().manual_seed(1)).to(DEVICE, dt)
    graphs = []
    with ieee_fp32():
        compiled = torch.compile(l2_attention, fullgraph=True, dynamic=False, backend=recording_inductor(graphs))
        for _ in range(4):   # as every step of training: a BlockCausal made afresh, the BlockMask kept
            out = compiled(qkv, scale_mul, BlockCausal.over_scales(LENGTHS, bias.to(dt), flex_mask=True), 'flex')
            dqkv, dmul = torch.autograd.grad(out, (qkv, scale_mul), grad_out)
    assert len(flex_on_cuda) == 1 and flex.cached_block_masks() == 1
    assert graphs and all('flex_attention' in gr and 'scaled_dot_product_attention' not in gr for gr in graphs)
    assert out.dtype == dt
    qkv64, mul64 = (t.detach().double().requires_grad_() for t in (qkv, scale_mul))   # float64 reference gradients
    want = l2_attention(qkv64, mul64, bias.double(), 'math')
    wqkv, wmul = torch.autograd.grad(want, (qkv64, mul64), grad_out.double())
    tol = KERNEL_TOL[dt]
    for what, got, ref, floor in (('output', out, want, 1.0), ('dqkv', dqkv, wqkv, 0.0), ('dscale_mul', dmul, wmul, 0.0)):
        err = max_rel_err(got, ref, floor)
        assert err <= tol, f'{dtype} {what}: error {err:.3g} > {tol:g}'


def test_compiled_var_blocks_on_flex_match_math_in_float32(flex_on_cuda):
    graphs = []
    with ieee_fp32():
        _, ref = tiny_on_cuda(seed=0, attn_l2_norm=False)
        _, var = tiny_on_cuda(seed=0, attn_l2_norm=False)
        for m in (ref, var):
            m.cond_drop_rate = 0.0   # eval mode: no stochastic depth either; gradients all the same
        ref.set_attn_backend('math')
        var.set_attn_backend('flex')
        for b in var.blocks:
            b.compile(fullgraph=True, dynamic=False, backend=recording_inductor(graphs))
        g = torch.Generator().manual_seed(3)
        labels = torch.tensor([0, 3, 4]).to(DEVICE)
        x_BLCv = torch.randn(3, var.L - var.first_l, var.Cvae, generator=g).to(DEVICE)
        results = {}
        for name, m in (('math', ref), ('flex', var)):
            for _ in range(3 if name == 'flex' else 1):
                m.zero_grad(set_to_none=True)
                logits_BLV = m(labels, x_BLCv)
                logits_BLV.float().square().mean().backward()
            results[name] = logits_BLV.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert len(flex_on_cuda) == 1   # one BlockMask for the three steps
    assert graphs and all('flex_attention' in gr and 'scaled_dot_product_attention' not in gr for gr in graphs)
    (want_logits, want_grads), (got_logits, got_grads) = results['math'], results['flex']
    err = max_rel_err(got_logits, want_logits)
    assert err <= 2e-5, f'logits differ from math by {err:.3g}'
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == len(list(var.parameters()))
    errors = {n: max_rel_err(got_grads[n], want_grads[n], 0.0) for n in want_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f'gradient of {worst} differs from math by {errors[worst]:.3g}'
