"""cpu_kernels: one switch for every fast path, each fast path equal to its reference path, the choices logged once."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cpu_kernels
from conftest import build_tiny
from cpu_kernels import attention as cpu_attention, choices, conv, matmul, memory, narrow_conv, upsample, winograd
from cpu_kernels.convert import convert_tree
from cpu_kernels.matmul import Linear
from cpu_kernels.winograd import Conv3x3
from models import VQVAE, attention as plain_attention


def test_one_switch_process_wide_and_restored_by_the_context_manager():
    vae, var = build_tiny()
    assert cpu_kernels.fast_paths_enabled()                 # on by default
    with cpu_kernels.fast_paths(False):
        assert not cpu_kernels.fast_paths_enabled()
        with cpu_kernels.fast_paths(True):
            assert cpu_kernels.fast_paths_enabled()
        assert not cpu_kernels.fast_paths_enabled()
    assert cpu_kernels.fast_paths_enabled()
    with pytest.raises(RuntimeError), cpu_kernels.fast_paths(False):
        raise RuntimeError('a failing block')
    assert cpu_kernels.fast_paths_enabled()                 # restored after an error too
    cpu_kernels.set_fast_paths(False)
    assert not cpu_kernels.fast_paths_enabled()
    cpu_kernels.set_fast_paths(True)
    assert cpu_kernels.fast_paths_enabled()
    with pytest.raises(TypeError, match='True or False'):
        cpu_kernels.set_fast_paths('off')


def test_the_switch_reaches_modules_by_what_they_compute_not_by_their_attributes(cpu_with_fast_kernels):
    """No module is looked up by attribute name: a Dropout (which has `inplace`) is left alone, and layers built
    after the switch, or outside VAR and VQVAE, follow it (on a CPU whose rule chooses oneDNN's linear, whatever runs
    the test)."""
    vae = cpu_kernels.convert(VQVAE(vocab_size=16, z_channels=8, ch=32, dropout=0.1, v_patch_nums=(1, 2), test_mode=False))
    dropouts = [m for m in vae.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and not any(m.inplace for m in dropouts)
    for enabled in (True, False, True):
        cpu_kernels.set_fast_paths(enabled)
        assert not any(m.inplace for m in dropouts), 'set_fast_paths must not make the dropouts in-place'
    if not matmul.onednn_available():
        pytest.skip('this PyTorch build has no oneDNN for this CPU')
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    lin = nn.Sequential(Linear(8, 4))
    x = torch.randn(3, 8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matmul, '_onednn_linear', lambda *a: calls.append(1) or real(*a[:3], 'none', [], ''))
        with torch.no_grad():
            lin(x)
            with cpu_kernels.fast_paths(False):
                lin2 = Linear(8, 4)
                lin(x), lin2(x)
    assert calls == [1]


def test_batch_invariant_conv_is_on_whatever_the_switch():
    """A reproducibility guarantee, not a speed path: image 0 alone and in a batch give the same bits, switch on or off."""
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 9, 9), torch.randn(16, 8, 3, 3) * 0.2, torch.randn(16)
    ref = conv.conv2d_reference(x.double(), w.double(), b.double(), padding=1)
    for enabled in (True, False):
        with torch.no_grad(), cpu_kernels.fast_paths(enabled):
            one, two = conv.conv2d(x[:1], w, b, padding=(1, 1)), conv.conv2d(x, w, b, padding=(1, 1))
        assert torch.equal(one[0], two[0]) or not conv.onednn_conv_available()
        assert (two.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_polyphase_upsampling_equals_its_reference_and_is_switched_off(memory_format, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=memory_format)
    w, b = torch.randn(16, 16, 3, 3) * 0.1, torch.randn(16)
    phases = []
    real = upsample.phase_kernels
    monkeypatch.setattr(upsample, 'phase_kernels', lambda w: phases.append(1) or real(w))
    fast = upsample.upsample2x_conv3x3(x, w, b)
    ref = upsample.upsample2x_conv3x3_reference(x, w, b)
    assert phases == [1] and fast.shape == ref.shape == (2, 16, 10, 14)
    assert (fast - ref).abs().max() < 1e-5 and not torch.equal(fast, ref)   # another algorithm, the same numbers
    with cpu_kernels.fast_paths(False):
        assert torch.equal(upsample.upsample2x_conv3x3(x, w, b), ref) and phases == [1]


def test_residual_add_in_place_only_without_autograd_and_with_the_switch_on():
    shortcut, h = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    want = shortcut + h
    with torch.no_grad():
        h1 = h.clone()
        assert memory.residual_add(shortcut, h1) is h1 and torch.equal(h1, want)
        h2 = h.clone()
        with cpu_kernels.fast_paths(False):
            out = memory.residual_add(shortcut, h2)
        assert out is not h2 and torch.equal(h2, h) and torch.equal(out, want)
    h3 = h.clone().requires_grad_()
    out = memory.residual_add(shortcut, h3)
    assert out is not h3 and torch.equal(out, want) and out.requires_grad


def test_conv_layout_and_image_groups_follow_the_switch(monkeypatch):
    x = torch.randn(5, 3, 8, 8)
    assert memory.to_conv_layout(x, 32, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    assert memory.to_conv_layout(x, 32, channels_last=False) is x
    monkeypatch.setattr(memory, 'CPU_CHUNK_BYTES', 2 * 4 * 8 * 8 * 4)   # two images of width 4 at 8×8 per group
    sizes = []

    def fn(x_BChw):
        sizes.append(x_BChw.shape[0])
        return x_BChw * 2
    with torch.no_grad():
        out = memory.in_image_groups(fn, x, 4, 8, 8)
        assert sizes == [2, 2, 1] and torch.equal(out, x * 2)
        sizes.clear()
        with cpu_kernels.fast_paths(False):
            assert memory.to_conv_layout(x, 32, channels_last=True) is x
            memory.in_image_groups(fn, x, 4, 8, 8)
        assert sizes == [5]
    sizes.clear()
    memory.in_image_groups(fn, x, 4, 8, 8)   # autograd on: the whole batch
    assert sizes == [5]


@pytest.mark.parametrize('backend', ['sdpa', 'math'])
def test_block_causal_attention_by_groups_equals_the_dense_mask(backend, monkeypatch):
    torch.manual_seed(0)
    lengths = [1, 4, 16, 64, 81]
    L = sum(lengths)
    scale_of = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    bias = torch.where(scale_of[:, None] >= scale_of[None, :], 0., -torch.inf).view(1, 1, L, L)
    spec = plain_attention.BlockCausal(plain_attention.block_causal_groups(lengths), bias)
    q, k, v = (torch.randn(2, 3, L, 8) for _ in range(3))
    grouped = []
    real = cpu_attention._block_causal_attention
    monkeypatch.setattr(cpu_attention, '_block_causal_attention', lambda *a: grouped.append(1) or real(*a))
    fast = cpu_attention.attention(q, k, v, 0.3, spec, backend=backend)
    dense = cpu_attention.attention(q, k, v, 0.3, bias, backend=backend)
    assert grouped == ([1] if backend != 'math' else [])   # 'math' is the reference: always the dense mask
    assert (fast - dense).abs().max() < 1e-5
    with cpu_kernels.fast_paths(False):
        plain = cpu_attention.attention(q, k, v, 0.3, spec, backend=backend)
    assert len(grouped) == (1 if backend != 'math' else 0) and torch.equal(plain, dense)
    # the models' own attention: the spec's dense mask, whatever the switch
    assert torch.equal(plain_attention.attention(q, k, v, 0.3, spec, backend=backend), dense)


def test_kernel_choices_are_logged_once_with_their_reasons(cpu_with_fast_kernels, monkeypatch, caplog):
    """On a CPU whose rule turns every CPU-chosen kernel on (the AMD one), whatever runs the test."""
    monkeypatch.setitem(choices._logged, 'done', False)
    with caplog.at_level(logging.INFO, logger='cpu_kernels'):
        build_tiny(fast=True)
        build_tiny(fast=True)
    records = [r for r in caplog.records if r.name == 'cpu_kernels' and 'fast kernels' in r.getMessage()]
    assert len(records) == 1
    text = records[0].getMessage()
    for name in ('oneDNN linear', 'Winograd 3x3 conv', 'polyphase upsampling', 'channels-last', 'in-place residual adds',
                 'groups of images', 'grouped block-causal attention', 'batch-invariant oneDNN conv', 'CPU rule', 'by taps', 'teacher-forcing attention in one function',
                 'training MLP recomputing its GELU', 'training AdaLN recomputing LN(x)'):
        assert name in text
    want = 'oneDNN linear: on (float32 CPU' if matmul.onednn_available() else 'oneDNN linear: off (this PyTorch build'
    assert want in text
    with cpu_kernels.fast_paths(False):
        assert all('on (' not in line or 'batch-invariant' in line for line in cpu_kernels.describe_choices())


def test_availability_probes_run_on_the_cpu_inside_a_device_context():
    """The first model may be built under `with torch.device('meta')` (build_vae_var): the probes must not be fooled."""
    had = matmul.onednn_available(), conv.onednn_conv_available()
    try:
        matmul.onednn_available.cache_clear()
        conv.onednn_conv_available.cache_clear()
        with torch.device('meta'):
            assert (matmul.onednn_available(), conv.onednn_conv_available()) == had
    finally:
        matmul.onednn_available.cache_clear()
        conv.onednn_conv_available.cache_clear()


def test_the_cpu_rule_reaches_the_kernels_and_the_log(fake_cpu, monkeypatch):
    """On a CPU whose rule says no (an Intel CPU with AMX) linear and 3x3 conv take PyTorch's kernels; on the
    AMD rule's CPU, oneDNN and Winograd; describe_choices says which rule matched and why."""
    from cpu_kernels import c_winograd, winograd
    onednn, wino = [], []
    real_lp, real_wino = matmul._onednn_linear, winograd.winograd_conv3x3
    monkeypatch.setattr(matmul, '_onednn_linear', lambda *a, **k: onednn.append(1) or real_lp(*a, **k))
    monkeypatch.setattr(winograd, 'winograd_conv3x3', lambda *a, **k: wino.append(1) or real_wino(*a, **k))
    torch.manual_seed(0)
    lin, x = Linear(16, 8), torch.randn(4, 16)
    conv_x, conv_w = torch.randn(1, 128, 64, 64), torch.randn(128, 128, 3, 3) * 0.03
    for (vendor, flags), used in ((('GenuineIntel', 'avx2 avx512f amx_bf16 amx_tile'), False), (('AuthenticAMD', 'avx2 avx512f'), True)):
        fake_cpu(vendor, flags, 2)
        onednn.clear(), wino.clear()
        with torch.no_grad():
            y = lin(x)
            conv_y = winograd.conv3x3(conv_x, conv_w)
        assert torch.allclose(y, torch.nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
        assert torch.allclose(conv_y, conv.conv2d_reference(conv_x, conv_w, padding=1), rtol=1e-3, atol=1e-3)
        winograd_here = winograd.nnpack_available() or not c_winograd.status()
        assert bool(onednn) == (used and matmul.onednn_available()) and bool(wino) == (used and winograd_here)
        lines = cpu_kernels.describe_choices()
        assert lines[0].startswith(f'CPU rule: this CPU ({vendor}') and ('"AMX"' in lines[0]) != used
        assert ('oneDNN linear: on' in '\n'.join(lines)) == (used and matmul.onednn_available())


@pytest.mark.parametrize('N, K, O', [(37, 24, 40), (37, 40, 24)])   # both orientations of the oneDNN call (O >= K and O < K)
def test_weight_gradient_by_onednn_equals_the_plain_matmul(N, K, O):
    if not matmul.onednn_available():
        pytest.skip('this PyTorch build has no oneDNN for this CPU')
    torch.manual_seed(0)
    grad_NO, x_NK = torch.randn(N, O), torch.randn(N, K)
    got = matmul._onednn_weight_grad(grad_NO, x_NK)
    assert got.shape == (O, K) and got.is_contiguous()
    assert torch.allclose(got, grad_NO.double().t().mm(x_NK.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('vendor, flags', [('AuthenticAMD', 'avx2 avx512f'), ('GenuineIntel', 'avx2 avx512f amx_tile')])
def test_training_mlp_keeps_less_and_gives_the_same_bits_as_two_linears(vendor, flags, fake_cpu):
    """The CPU training MLP recomputes its GELU in the backward instead of keeping it: the same outputs and gradients,
    bit for bit, as fc1 + GELU + fc2 through `linear` (oneDNN on the AMD rule, F.linear on the AMX one), and one
    (N, 4C) tensor fewer kept for the backward."""
    fake_cpu(vendor, flags, 2)
    from models.basic_var import FFN
    torch.manual_seed(0)
    ffn = convert_tree(FFN(32, 128, fused_if_available=False))
    x, g = torch.randn(2, 9, 32, requires_grad=True), torch.randn(2, 9, 32)

    def run(two_linears):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            y = ffn.fc2(matmul.linear(x, ffn.fc1.weight, ffn.fc1.bias, act='gelu_tanh')) if two_linears else ffn(x)
        return [y, *torch.autograd.grad(y, [x, *ffn.parameters()], g)], sum(kept)
    (fast, kept_fast), (plain, kept_plain) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert kept_plain - kept_fast >= 2 * 9 * 128        # the GELU's output is not kept
    with torch.no_grad():
        assert torch.allclose(ffn(x), plain[0], rtol=1e-5, atol=1e-5)   # inference: GELU fused into fc1


@pytest.mark.parametrize('shared_aln', [False, True])
def test_training_adaln_keeps_x_not_its_norm_and_gives_the_same_bits(shared_aln, monkeypatch):
    """VAR's teacher forcing with the AdaLN that recomputes LN(x) in the backward: logits and every parameter's gradient
    equal, bit for bit, those of LN(x)·(1 + scale) + shift through autograd, with fewer activations kept."""
    from cpu_kernels import adaln, transformer
    _, var = build_tiny(fast=True, shared_aln=shared_aln)
    var.train()
    var.cond_drop_rate = 0
    g = torch.Generator().manual_seed(0)
    x_BLCv = torch.randn(3, var.L - var.first_l, var.Cvae, generator=g)
    label_B, gt_BL = torch.tensor([0, 1, 2]), torch.randint(0, var.V, (3, var.L), generator=g)

    def run():
        kept = []
        torch.manual_seed(0)   # the same drop-path draws
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            logits_BLV = var(label_B, x_BLCv)
            loss = torch.nn.functional.cross_entropy(logits_BLV.view(-1, var.V), gt_BL.view(-1))
        return [logits_BLV, *torch.autograd.grad(loss, list(var.parameters()))], sum(kept)
    fast, kept_fast = run()
    monkeypatch.setattr(transformer, 'ada_layer_norm', adaln.ada_layer_norm_reference)
    plain, kept_plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, plain))
    assert kept_plain - kept_fast >= (2 * var.depth + 1) * 3 * var.L * var.C   # LN(x) of every AdaLN, the head's too


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
def test_a_conv_to_few_channels_by_taps_equals_the_direct_conv_image_by_image(memory_format):
    torch.manual_seed(0)
    x = torch.randn(3, 40, 9, 11).contiguous(memory_format=memory_format)
    w, b = torch.randn(3, 40, 3, 3) * 0.1, torch.randn(3)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    with torch.no_grad():
        got, got_nobias = narrow_conv.conv3x3_by_taps(x, w, b), narrow_conv.conv3x3_by_taps(x, w)
        assert torch.equal(narrow_conv.conv3x3_by_taps(x[1:2], w, b)[0], got[1])   # an image's result without its batch
    assert got.shape == ref.shape and (got.double() - ref).abs().max() < 1e-5
    assert (got_nobias.double() - (ref - b.double().view(1, 3, 1, 1))).abs().max() < 1e-5


def test_the_decoders_conv_to_rgb_goes_by_taps_only_in_float32_cpu_inference_with_the_switch_on(monkeypatch):
    torch.manual_seed(0)
    conv = Conv3x3(40, 3)
    x = torch.randn(2, 40, 8, 8)
    calls = []
    real = narrow_conv.conv3x3_by_taps
    monkeypatch.setattr(winograd, 'conv3x3_by_taps', lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fast = conv(x)
        assert len(calls) == 1
        with cpu_kernels.fast_paths(False):
            plain = conv(x)
        Conv3x3(40, 8)(x)   # 8 outputs: a plain conv
        assert len(calls) == 1
    assert (fast - plain).abs().max() < 1e-5 and not torch.equal(fast, plain)   # another summation order, the same numbers
    assert conv(x).requires_grad and len(calls) == 1   # autograd (tokenizer training): the direct conv
    from models.basic_vae import Decoder
    assert isinstance(convert_tree(Decoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)).conv_out, Conv3x3)
