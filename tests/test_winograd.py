"""Winograd 3×3 convs of CPU inference, by this package's C kernel and by NNPACK: same numbers as the direct conv,
used exactly where they pay."""
import pytest
import torch
import torch.nn.functional as F

from cpu_kernels import c_winograd, convert, fast_paths, set_fast_paths, winograd
from cpu_kernels.convert import convert_tree
from cpu_kernels.winograd import Conv3x3, winograd_conv3x3
from models import VQVAE
from models.basic_vae import Upsample2x

pytestmark = pytest.mark.usefixtures('cpu_with_fast_kernels')   # the kernels as the AMD rule chooses them

NNPACK_CALL = torch._nnpack_spatial_convolution


class Calls(list):
    """Input shapes given to the implementation `impl`."""
    impl = ''


@pytest.fixture(params=['c', 'nnpack'])
def winograd_calls(request, monkeypatch):
    """Each Winograd implementation in turn (the C kernel where it runs here, NNPACK where this PyTorch has it; the
    other one switched off), counting the input shapes it is given."""
    calls = Calls()
    if request.param == 'c':
        if c_winograd.status():
            pytest.skip(f'the C Winograd kernel does not run here: {c_winograd.status()}')
        real = c_winograd.conv3x3
        monkeypatch.setattr(c_winograd, 'conv3x3', lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    else:
        if not winograd.nnpack_available():
            pytest.skip('this PyTorch build has no NNPACK for this CPU')
        monkeypatch.setattr(c_winograd, 'status', lambda: 'switched off by the test')
        monkeypatch.setattr(torch, '_nnpack_spatial_convolution', lambda x, *a: calls.append(tuple(x.shape)) or NNPACK_CALL(x, *a))
    calls.impl = request.param
    return calls


def test_winograd_conv_equals_the_direct_conv(winograd_calls):
    torch.manual_seed(0)
    x = torch.randn(3, 128, 64, 64)
    w, b = torch.randn(160, 128, 3, 3) * 0.03, torch.randn(160)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    for x_in in (x, x.contiguous(memory_format=torch.channels_last)):
        got = winograd_conv3x3(x_in, w, b)
        layout = torch.channels_last if winograd_calls.impl == 'c' else torch.contiguous_format   # what each reads
        assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous(memory_format=layout)
        assert (got.double() - ref).abs().max() / ref.abs().max() < 1e-4
        assert (got.double() - ref).abs().max() / ref.abs().max() > 1e-9   # really another algorithm, not a copy of the direct conv
    assert len(winograd_calls) == (2 if winograd_calls.impl == 'c' else 6)   # NNPACK: image by image


def test_conv3x3_goes_by_winograd_only_where_it_pays_and_applies(winograd_calls):
    torch.manual_seed(0)
    conv = Conv3x3(128, 128)
    assert isinstance(conv, torch.nn.Conv2d) and set(conv.state_dict()) == {'weight', 'bias'}   # checkpoint keys unchanged
    big, small = torch.randn(2, 128, 64, 64), torch.randn(2, 128, 32, 32)
    with torch.no_grad():
        out = conv(big)
        # NNPACK one image at a time (its fast inference path), the C kernel the batch at once
        assert winograd_calls == ([(2, 128, 64, 64)] if winograd_calls.impl == 'c' else [(1, 128, 64, 64)] * 2)
        assert torch.allclose(out, F.conv2d(big, conv.weight, conv.bias, padding=1), atol=1e-4)
        winograd_calls.clear()
        conv(small)                                 # a 32² map: under WINOGRAD_MIN_HW, the direct conv
        Conv3x3(64, 64)(torch.randn(1, 64, 64, 64))  # 64 channels: under WINOGRAD_MIN_CHANNELS, the direct conv
        with torch.autocast('cpu', dtype=torch.bfloat16):
            conv(big)                               # autocast asks for bfloat16
        with fast_paths(False):
            conv(big)                               # switched off (cpu_kernels.fast_paths(False))
        assert winograd_calls == []
    out = conv(big)                                 # autograd on (tokenizer training): the direct conv, differentiable
    assert winograd_calls == [] and out.requires_grad


def test_upsample_goes_by_phases_or_by_the_c_kernel_reading_it_upsampled(winograd_calls):
    """Where the 3×3 conv at the large size would go by Winograd, the upsampling conv goes by phases on the small input
    (chosen over NNPACK on the upsampled one, and closer to the plain path: cpu_kernels/upsample.py), or, by this package's
    kernel, straight from the small input, read as if upsampled."""
    torch.manual_seed(0)
    up = convert_tree(Upsample2x(128))
    x = torch.randn(2, 128, 32, 32)
    with torch.no_grad():
        fast = up(x)
        assert winograd_calls == ([(2, 128, 32, 32)] if winograd_calls.impl == 'c' else [])
        with fast_paths(False):
            plain = up(x)
    assert fast.shape == (2, 128, 64, 64) and (fast - plain).abs().max() < 1e-4


def test_tokenizer_with_winograd_matches_the_plain_path(winograd_calls):
    """A tokenizer wide enough for Winograd (ch=128, 64-px images): features, tokens and images as on the plain path."""
    torch.manual_seed(0)
    vae = convert(VQVAE(vocab_size=64, z_channels=8, ch=128, v_patch_nums=(1, 2, 4), test_mode=True))
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f_fast, idx_fast = vae.encode(img), vae.img_to_idxBl(img)
        rec_fast = vae.idxBl_to_img(idx_fast, same_shape=True, last_one=True)
        small = (32, 32) if winograd_calls.impl == 'c' else (64, 64)   # the C kernel reads the upsampling conv's small input
        assert winograd_calls and all(s[-2:] in ((64, 64), small) for s in winograd_calls)
        n_fast = len(winograd_calls)
        set_fast_paths(False)
        f_ref, idx_ref = vae.encode(img), vae.img_to_idxBl(img)
        rec_ref = vae.idxBl_to_img(idx_ref, same_shape=True, last_one=True)
        assert len(winograd_calls) == n_fast   # the plain path never goes by Winograd
    assert (f_fast - f_ref).abs().max() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(idx_fast, idx_ref))
    assert (rec_fast - rec_ref).abs().max() < 1e-3 and rec_fast.is_contiguous()


@pytest.mark.skipif(not winograd.nnpack_available(), reason='this PyTorch build has no NNPACK for this CPU')
def test_a_failing_nnpack_falls_back_to_the_direct_conv_and_says_so(monkeypatch, caplog):
    torch.manual_seed(0)
    monkeypatch.setattr(c_winograd, 'status', lambda: 'switched off by the test')   # NNPACK is the Winograd here
    calls = []

    def failing(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        raise RuntimeError('NNPACK SpatialConvolution_updateOutput failed')
    monkeypatch.setattr(torch, '_nnpack_spatial_convolution', failing)
    monkeypatch.setitem(winograd._failure, 'error', None)
    conv = Conv3x3(128, 128)
    x = torch.randn(2, 128, 64, 64)
    with torch.no_grad():
        first = conv(x)
        second = conv(x)
    ref = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert torch.allclose(first, ref, atol=1e-5) and torch.allclose(second, ref, atol=1e-5)
    assert calls == [(1, 128, 64, 64)]   # tried once, then the direct conv only
    assert 'NNPACK Winograd conv failed' in caplog.text and not winograd.nnpack_available()
