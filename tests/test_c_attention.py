"""The C block-causal attention kernel (csrc/block_causal_attention.c): the plain path's output and gradients, the
same bits however many threads share it, NaN kept, chosen by the CPU's rule, built once into its cache, and PyTorch's
kernel where it cannot be built."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny
from cpu_kernels import block_causal, c_attention, convert, fast_paths, native
from cpu_kernels.attention import attention
from cpu_kernels.choices import describe_choices
from cpu_kernels.cpu_rules import read_cpu_features
from models.attention import BlockCausal
from test_attention import block_causal_bias
from test_cpu_attention import assert_fused_equals_plain, logits_and_grads_fast_and_plain, plain_self_attention

REPO = Path(__file__).resolve().parents[1]
AVX512 = 'avx512f' in read_cpu_features().flags
needs_avx512 = pytest.mark.skipif(not AVX512, reason='the C kernel is AVX-512 code; this CPU has no avx512f')


@pytest.fixture
def c_kernel_on(fake_cpu):
    """A CPU whose rule chooses the kernel (AMD, AVX-512, 2 cores), whatever this machine's vendor."""
    fake_cpu('AuthenticAMD', 'avx2 avx512f', 2)
    assert c_attention.status() == '', c_attention.status()


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A fresh, empty kernel cache (and no build remembered by this process)."""
    monkeypatch.setenv('VAR_KERNEL_CACHE', str(tmp_path / 'kernels'))
    native.library.cache_clear()
    c_attention._kernels.cache_clear()
    yield tmp_path / 'kernels'
    native.library.cache_clear()
    c_attention._kernels.cache_clear()


def spy_on_c_kernel(monkeypatch):
    calls = []
    real = native.run_split
    monkeypatch.setattr(native, 'run_split', lambda fn, n, args: calls.append(fn.__name__) or real(fn, n, args))
    return calls


@needs_avx512
@pytest.mark.parametrize('l2', [True, False])
@pytest.mark.parametrize('patch_nums, B, H', [
    ((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 1, 2),   # the 256 px scales: 680 tokens, rows that end past a 48-row block
    ((1, 2, 4, 8, 9), 3, 1),                      # 3 slices over 2 threads
    ((3, 7), 1, 1),                               # one slice; key ends 9 and 58, neither a multiple of 16
])
def test_c_kernel_equals_the_plain_path(patch_nums, B, H, l2, c_kernel_on, monkeypatch):
    """Output, qkv's gradient and the q scale's gradient of the C kernel equal the plain path's (float64, dense mask)
    within float32 rounding; a gradient with stride 0 (from .sum()) too."""
    torch.manual_seed(0)
    lengths = [pn * pn for pn in patch_nums]
    L, c = sum(lengths), c_attention.C_HEAD_DIM
    mask = BlockCausal.over_scales(lengths, block_causal_bias(patch_nums, as_bool=False))
    qkv = (torch.randn(B, L, 3, H, c) * 2).requires_grad_()
    scale_mul = (torch.randn(1, H, 1, 1) * 0.3 + 1.4).exp().requires_grad_() if l2 else None
    scale = 1.0 if l2 else 0.25 / math.sqrt(c)
    calls = spy_on_c_kernel(monkeypatch)
    assert_fused_equals_plain(qkv, scale_mul, scale, mask)
    assert calls == ['block_causal_attention_forward', 'block_causal_attention_backward'] * 2


@needs_avx512
def test_c_kernel_gives_the_same_bits_on_one_thread_and_on_two(c_kernel_on):
    """Each (batch, head) slice is computed whole by one thread: splitting the slices changes no bit."""
    torch.manual_seed(1)
    lengths = [1, 4, 9, 16, 64]
    mask = BlockCausal.over_scales(lengths, block_causal_bias((1, 2, 3, 4, 8), as_bool=False))
    qkv = torch.randn(3, sum(lengths), 3, 3, 64)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x = qkv.clone().requires_grad_()
            out = block_causal.block_causal_self_attention(x, None, 0.125, mask)
            out.square().sum().backward()
            results.append((out.detach(), x.grad))
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


@needs_avx512
def test_c_kernel_keeps_nan(c_kernel_on):
    """A NaN in a key every query reads makes every output NaN (the training loop's non-finite guard then sees it),
    never a finite number."""
    lengths = [1, 4, 16]
    mask = BlockCausal.over_scales(lengths, block_causal_bias((1, 2, 4), as_bool=False))
    qkv = torch.randn(1, 21, 3, 1, 64)
    qkv[0, 0, 1, 0, 5] = float('nan')
    assert block_causal.block_causal_self_attention(qkv, None, 0.125, mask).isnan().all()


@needs_avx512
def test_training_step_takes_the_c_kernel_and_equals_the_plain_path(c_kernel_on, monkeypatch):
    """A VAR with head dimension 64 in training mode: every block's attention goes through the C kernel (the model
    builds its mask with key ends), and the logits and every parameter's gradient equal those of the plain path."""
    from models import VAR
    vae, _ = build_tiny(patch_nums=(1, 2, 4, 8))
    var = convert(VAR(vae, num_classes=5, depth=2, embed_dim=128, num_heads=2, patch_nums=(1, 2, 4, 8)))
    var.init_weights(init_adaln_gamma=1.0, init_head=1.0)
    var.train()
    var.cond_drop_rate = 0.0
    calls = spy_on_c_kernel(monkeypatch)
    outs = logits_and_grads_fast_and_plain(var, torch.tensor([0, 3, 4]), torch.randn(3, var.L - 1, var.Cvae))
    assert calls.count('block_causal_attention_forward') == calls.count('block_causal_attention_backward') == len(var.blocks)
    assert (outs[True][0] - outs[False][0]).abs().max() < 1e-5
    for name, g in outs[False][1].items():
        assert (outs[True][1][name] - g).abs().max() <= 1e-4 * max(g.abs().max(), 1e-3), name


@needs_avx512
def test_sampling_attention_against_the_kv_cache_takes_the_c_kernel(c_kernel_on, monkeypatch):
    """Unmasked attention without autograd (a scale's queries against more cached keys) goes through the C kernel and
    equals the plain matmul-softmax; with autograd, a mask or the fast paths off it does not."""
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 25, 64), torch.randn(3, 2, 55, 64), torch.randn(3, 2, 55, 64)
    calls = spy_on_c_kernel(monkeypatch)
    with torch.inference_mode():
        got = attention(q, k, v, 0.125)
    assert calls == ['block_causal_attention_forward']
    want = ((q.double() @ k.double().transpose(-1, -2)) * 0.125).softmax(-1) @ v.double()
    assert got.shape == (3, 2, 25, 64) and (got - want).abs().max() < 1e-5 * want.abs().max()
    attention(q.requires_grad_(), k, v, 0.125)
    attention(q.detach(), k, v, 0.125, attn_bias=torch.zeros(25, 55))
    with fast_paths(False):
        attention(q.detach(), k, v, 0.125)
    assert calls == ['block_causal_attention_forward']


@needs_avx512
def test_sampled_images_are_those_of_pytorchs_kernel(c_kernel_on, monkeypatch):
    """A VAR of head dim 64 samples the same images with the C kernel as with PyTorch's (KV-cached, guidance on)."""
    from models import VAR
    vae, _ = build_tiny(patch_nums=(1, 2, 4, 8))
    var = convert(VAR(vae, num_classes=5, depth=2, embed_dim=128, num_heads=2, patch_nums=(1, 2, 4, 8)))
    var.init_weights(init_adaln_gamma=1.0, init_head=1.0)
    var.eval()
    calls = spy_on_c_kernel(monkeypatch)
    images = []
    for usable in (c_attention.usable, lambda head_dim: False):
        monkeypatch.setattr(c_attention, 'usable', usable)
        with torch.inference_mode():
            images.append(var.autoregressive_infer_cfg(B=3, label_B=torch.tensor([0, 3, 4]), g_seed=7, cfg=2.0, top_k=20, top_p=0.9))
    assert len(calls) == len(var.blocks) * len(var.patch_nums)   # every block at every scale, the first run only
    assert (images[0] - images[1]).abs().max() < 1e-4


def test_c_kernel_runs_only_where_the_rule_and_the_shapes_say(fake_cpu):
    mask = BlockCausal.over_scales([1, 4], block_causal_bias((1, 2), as_bool=False))
    fake_cpu('GenuineIntel', 'avx2 avx512f amx_tile amx_bf16', 2)   # a rule that does not choose it: PyTorch's kernel
    assert c_attention.status() == 'not chosen for this CPU'
    assert not block_causal.c_kernel_applies(64, mask)
    assert any(line.startswith('C attention kernel: off (not chosen for this CPU') for line in describe_choices())
    if AVX512:
        fake_cpu('AuthenticAMD', 'avx2 avx512f', 2)
        assert block_causal.c_kernel_applies(64, mask)
        assert not block_causal.c_kernel_applies(16, mask)                       # written for head dim 64 only
        assert not block_causal.c_kernel_applies(64, BlockCausal(mask.groups, mask.bias))   # no key ends: by groups
        assert any(line.startswith('C attention kernel: on') for line in describe_choices())


def test_key_ends_are_the_dense_masks_rows():
    """over_scales' key ends say, row by row, what the dense block-causal mask says."""
    patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    mask = BlockCausal.over_scales([pn * pn for pn in patch_nums], block_causal_bias(patch_nums, as_bool=False))
    keep = block_causal_bias(patch_nums, as_bool=True)[0, 0]
    assert mask.key_end.dtype == torch.int32 and torch.equal(keep.sum(-1).int(), mask.key_end)
    assert torch.equal(keep, torch.arange(keep.shape[1])[None, :] < mask.key_end[:, None])


_LOAD = r'''
import sys
sys.path.insert(0, {repo!r})
from cpu_kernels import native
lib, where = native.library('block_causal_attention')
print(where if lib is not None else 'UNAVAILABLE: ' + where)
'''


@needs_avx512
def test_kernel_is_built_once_into_its_cache_and_loaded_after(kernel_cache):
    """The first process compiles into the cache (no temporary left behind); the next loads that file as it is."""
    run = lambda: subprocess.run([sys.executable, '-c', _LOAD.format(repo=str(REPO))], capture_output=True, text=True,
                                 env=dict(os.environ), timeout=300, check=True).stdout.strip()
    first = run()
    built = Path(first)
    assert built.parent == kernel_cache and built.name.startswith('block_causal_attention-') and built.suffix == '.so'
    assert sorted(p.name for p in kernel_cache.iterdir()) == [built.name]
    mtime = built.stat().st_mtime_ns
    assert run() == first and built.stat().st_mtime_ns == mtime


def test_without_a_compiler_pytorchs_kernel_runs_and_says_why(kernel_cache, fake_cpu, monkeypatch, caplog):
    """No C compiler: the C kernel is off with the reason in describe_choices and the log; the attention is the same."""
    fake_cpu('AuthenticAMD', 'avx2 avx512f', 2)
    monkeypatch.setenv('CC', 'no-such-compiler-here')
    lengths = [1, 4, 16]
    mask = BlockCausal.over_scales(lengths, block_causal_bias((1, 2, 4), as_bool=False))
    qkv = torch.randn(2, 21, 3, 2, 64)
    with caplog.at_level('WARNING', logger='cpu_kernels.native'):
        assert not block_causal.c_kernel_applies(64, mask)
    assert "'no-such-compiler-here' not found" in c_attention.status()
    assert any('C kernel block_causal_attention unavailable' in r.getMessage() for r in caplog.records)
    assert any('C attention kernel: off (no C compiler' in line for line in describe_choices())
    got = block_causal.block_causal_self_attention(qkv, None, 0.125, mask)
    want = plain_self_attention(qkv, None, 0.125, mask.bias)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert not kernel_cache.exists() or not any(kernel_cache.iterdir())


def test_a_failed_build_leaves_no_file_and_says_why(kernel_cache, tmp_path, monkeypatch):
    """A compiler that fails: no library in the cache (nor a half-written one), and its message in the reason."""
    cc = tmp_path / 'badcc'
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo badcc 1.0; exit 0; }\necho "error: cannot compile" >&2\nexit 1\n')
    cc.chmod(0o755)
    monkeypatch.setenv('CC', str(cc))
    lib, why = native.library('block_causal_attention')
    assert lib is None and 'error: cannot compile' in why
    assert not any(kernel_cache.iterdir())
