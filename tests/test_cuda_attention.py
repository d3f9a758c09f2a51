"""Attention kernels on CUDA agree: SDPA's flash, memory-efficient, cuDNN and math kernels (each forced alone with
torch.nn.attention.sdpa_kernel) and the project's flash-attn and xformers backends when importable.

Kernel level: outputs and gradients against a float64 matmul-softmax on the same inputs, with tolerances set
by the input precision (float32: 5e-5; float16: 4e-3; bfloat16: 3e-2, in units of max(1, max |reference|)).
Model level (a tiny VAR whose scales 1, 2, 4, 8 make one masked and one unmasked attention group): block-causal
teacher forcing (logits and parameter gradients) and KV-cached sampling (its logits against teacher forcing
of the tokens it drew) under each route, in float32 and bfloat16 autocast. In bfloat16 a route may differ from
the float32 result by at most 3x (plus 2e-3) what the plain matmul-softmax path does in bfloat16 itself;
a wrong mask or cache shows up as an error of order one.
"""
import contextlib

import pytest
import torch

from cpu_kernels import set_fast_paths
from cuda_util import CUDA_MARKS, DEVICE, ieee_fp32, max_rel_err, tiny_on_cuda
from models.attention import attention, backend_status
from test_attention import block_causal_bias, reference_attention

pytestmark = CUDA_MARKS

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
KERNEL_TOL = {torch.float32: 5e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PATCH_NUMS = (1, 2, 3, 4, 5)    # 55 tokens: not a multiple of 8, as the real 680 is not


def sdpa_only(*names):
    """A context that lets SDPA use only these kernels (raises inside it when none applies)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def kernel_applies(kernel: str, dtype: torch.dtype, masked: bool) -> bool:
    """Whether SDPA's kernel must run this case (flash: half precision and no mask; the others: any)."""
    return not (kernel == 'FLASH_ATTENTION' and (masked or dtype == torch.float32))


def qkv_case(case: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    B, H, c = 2, 4, 64
    L = sum(pn * pn for pn in PATCH_NUMS)
    Lq = PATCH_NUMS[-1] ** 2 if case == 'kv_cache' else L    # sampling: the last scale's queries against the whole cache
    q = torch.randn(B, H, Lq, c, generator=g)
    k, v = torch.randn(B, H, L, c, generator=g), torch.randn(B, H, L, c, generator=g)
    bias = None
    if case in ('float_mask', 'bool_mask'):
        bias = block_causal_bias(PATCH_NUMS, as_bool=case == 'bool_mask')
        bias = bias if bias.dtype == torch.bool else bias.to(dtype)
        bias = bias.to(DEVICE)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)], bias


def check_against_reference(fn, case, dtype):
    (q, k, v), bias = qkv_case(case, dtype)
    out = fn(q, k, v, bias)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))   # float64 leaves: float64 reference gradients
    want = reference_attention(qd, kd, vd, 0.3, bias)
    wq, wk, wv = torch.autograd.grad(want, (qd, kd, vd), grad_out.float())
    tol = KERNEL_TOL[dtype]
    for what, got, ref, floor in (('output', out, want, 1.0), ('dq', dq, wq, 0.0), ('dk', dk, wk, 0.0), ('dv', dv, wv, 0.0)):
        err = max_rel_err(got, ref, floor)
        assert err <= tol, f'{what}: error {err:.3g} > {tol:g}'


CASES = ['no_mask', 'float_mask', 'bool_mask', 'kv_cache']
MASKED = ('float_mask', 'bool_mask')   # the cases that pass a mask ('no_mask' ends in 'mask' too)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('kernel', ['FLASH_ATTENTION', 'EFFICIENT_ATTENTION', 'MATH', 'CUDNN_ATTENTION'])
def test_sdpa_kernel_matches_reference(kernel, dtype, case):
    dt = DTYPES[dtype]
    masked = case in MASKED
    if not kernel_applies(kernel, dt, masked):
        pytest.skip(f'SDPA flash takes no mask and no float32 ({case}, {dtype})')

    def fn(q, k, v, bias):
        with sdpa_only(kernel):
            return attention(q, k, v, scale=0.3, attn_bias=bias, backend='sdpa')
    with ieee_fp32():
        if kernel == 'CUDNN_ATTENTION':   # optional: depends on the cuDNN build and the card
            try:
                check_against_reference(fn, case, dt)
            except RuntimeError as e:   # not built in, or not for this card, head size or mask; wrong numbers still fail
                pytest.skip(f'SDPA cuDNN attention does not run this case here: {str(e).splitlines()[0][:200]}')
        else:
            check_against_reference(fn, case, dt)


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('dtype', ['fp16', 'bf16'])
@pytest.mark.parametrize('backend', ['flash', 'xformers'])
def test_optional_backend_matches_reference(backend, dtype, case):
    usable, why = backend_status(backend)
    if not usable:
        pytest.skip(why)
    if backend == 'flash' and case in MASKED:
        pytest.skip('flash-attn takes no mask: the project sends masked calls to SDPA')
    with ieee_fp32():
        check_against_reference(lambda q, k, v, bias: attention(q, k, v, scale=0.3, attn_bias=bias, backend=backend), case, DTYPES[dtype])


# ---------------------------------------------------------------------------------------------- model level
def routes(dtype: str):
    """(name, model backend, SDPA kernels allowed or None for PyTorch's choice) to try in this precision."""
    out = [('sdpa (auto)', 'sdpa', None), ('sdpa math', 'sdpa', ('MATH',)), ('sdpa efficient', 'sdpa', ('EFFICIENT_ATTENTION',))]
    if dtype == 'bf16':   # flash for the unmasked group and KV-cached sampling, efficient for the masked group
        out.append(('sdpa flash+efficient', 'sdpa', ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION')))
        out += [(b, b, None) for b in ('flash', 'xformers') if backend_status(b)[0]]
    return out


def route_ctx(dtype: str, kernels):
    ctx = contextlib.ExitStack()
    if kernels:
        ctx.enter_context(sdpa_only(*kernels))
    if dtype == 'bf16':
        ctx.enter_context(torch.autocast(DEVICE.type, dtype=torch.bfloat16))
    return ctx


@pytest.fixture(scope='module')
def tiny_model():
    with ieee_fp32():
        vae, var = tiny_on_cuda(patch_nums=(1, 2, 4, 8), fast=True)   # converted, as the scripts run it
        var.cond_drop_rate = 0.0
        yield vae, var


def teacher_forcing(var, backend, grouped, dtype, kernels, labels, x):
    var.set_attn_backend(backend)
    set_fast_paths(grouped)
    var.zero_grad(set_to_none=True)
    with route_ctx(dtype, kernels):
        logits = var(labels, x)
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


@pytest.mark.parametrize('grouped', [True, False], ids=['grouped', 'dense_mask'])
@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_masked_training_attention_routes_agree(tiny_model, dtype, grouped):
    vae, var = tiny_model
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 3, 4]).to(DEVICE)
    x = torch.randn(3, var.L - 1, var.Cvae, generator=g).to(DEVICE)
    try:
        want_logits, want_grads = teacher_forcing(var, 'math', False, 'fp32', None, labels, x)
        floor_logits, floor_grads = 2e-5, 1e-4
        if dtype == 'bf16':   # what the plain path itself loses in bfloat16
            l16, g16 = teacher_forcing(var, 'math', False, 'bf16', None, labels, x)
            floor_logits = 3 * max_rel_err(l16, want_logits) + 2e-3
            floor_grads = 3 * max(max_rel_err(g16[n], want_grads[n], 0.0) for n in want_grads) + 2e-3
        for name, backend, kernels in routes(dtype):
            logits, grads = teacher_forcing(var, backend, grouped, dtype, kernels, labels, x)
            err = max_rel_err(logits, want_logits)
            assert err <= floor_logits, f'{name}: logits differ from float32 math by {err:.3g} > {floor_logits:.3g}'
            assert grads.keys() == want_grads.keys(), name
            worst = max(want_grads, key=lambda n: max_rel_err(grads[n], want_grads[n], 0.0))
            err = max_rel_err(grads[worst], want_grads[worst], 0.0)
            assert err <= floor_grads, f'{name}: gradient of {worst} differs by {err:.3g} > {floor_grads:.3g}'
    finally:
        var.set_attn_backend('sdpa')
        set_fast_paths(True)
        var.zero_grad(set_to_none=True)


def kv_cached_error(var, vae, backend, dtype, kernels, cfg=2.5):
    """Max error of the KV-cached logits of one sampling call against float32 math teacher forcing of its own tokens."""
    B = 3
    labels = torch.tensor([0, 4, 2]).to(DEVICE)
    record = {}
    var.set_attn_backend(backend)
    with torch.no_grad(), route_ctx(dtype, kernels):
        var.autoregressive_infer_cfg(B=B, label_B=labels, g_seed=7, cfg=cfg, top_k=20, top_p=0.9,
                                     on_scale=lambda si, lg, idx: record.__setitem__(si, (lg.float(), idx)))
    idx_Bl = [record[si][1] for si in range(len(var.patch_nums))]
    var.set_attn_backend('math')
    set_fast_paths(False)
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(idx_Bl)
        cond, uncond = var(labels, x), var(torch.full_like(labels, var.num_classes), x)
    set_fast_paths(True)
    errs = []
    for si, (bg, ed) in enumerate(var.begin_ends):
        lg = record[si][0]
        errs += [max_rel_err(lg[:B], cond[:, bg:ed]), max_rel_err(lg[B:], uncond[:, bg:ed])]
    assert all(b.attn.cached_k is None and not b.attn.caching for b in var.blocks), 'the KV cache must be cleared afterwards'
    return max(errs)


@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
def test_kv_cached_sampling_routes_agree_with_teacher_forcing(tiny_model, dtype):
    vae, var = tiny_model
    try:
        tol = 1e-4
        if dtype == 'bf16':
            tol = 3 * kv_cached_error(var, vae, 'math', 'bf16', None) + 2e-3
        for name, backend, kernels in routes(dtype):
            err = kv_cached_error(var, vae, backend, dtype, kernels)
            assert err <= tol, f'{name}: KV-cached logits differ from teacher forcing by {err:.3g} > {tol:.3g}'
    finally:
        var.set_attn_backend('sdpa')
        set_fast_paths(True)
