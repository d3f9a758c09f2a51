"""The C Winograd kernel (csrc/winograd_conv3x3.c): the direct conv's numbers on any shape, the same bits however many
threads share it, taken by the tokenizer where the CPU's rule chooses Winograd, and NNPACK where it cannot be built."""
import pytest
import torch
import torch.nn.functional as F

from cpu_kernels import c_winograd, convert, fast_paths, native, set_fast_paths, winograd
from cpu_kernels.choices import describe_choices
from cpu_kernels.convert import convert_tree
from cpu_kernels.winograd import Conv3x3
from models import VQVAE

needs_kernel = pytest.mark.skipif(bool(c_winograd.status()), reason=f'the C Winograd kernel does not run here: {c_winograd.status()}')


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_kernel
@pytest.mark.parametrize('B, C, O, h, w', [
    (1, 16, 16, 1, 1),      # one pixel: a tile that is all padding but one input
    (2, 48, 80, 5, 7),      # sides not multiples of 4; 80 outputs = 64 + 16 (a narrower register block)
    (3, 32, 48, 13, 9),     # 48 outputs: three vectors; 3 images of 4 × 3 tiles over the threads
    (1, 160, 160, 36, 40),  # the tokenizer's width: 90 tiles, more than one block of tiles, the last one short
    (1, 96, 32, 8, 64),     # a row of 16 tiles
])
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('channels_last', [True, False])
def test_c_winograd_equals_the_direct_conv(B, C, O, h, w, bias, channels_last):
    torch.manual_seed(0)
    x = torch.randn(B, C, h, w)
    weight, b = torch.randn(O, C, 3, 3) / (3 * C ** 0.5), (torch.randn(O) if bias else None)
    want = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    got = c_winograd.conv3x3(x.contiguous(memory_format=torch.channels_last) if channels_last else x, weight, b)
    assert got.shape == (B, O, h, w) and got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(got, want) < 3e-5               # float32 rounding of the transforms (NNPACK's F(6×6): ~1e-5)
    assert relative_error(got, want) > 1e-9 or h * w == 1  # another algorithm, not the direct conv


@needs_kernel
def test_c_winograd_gives_the_same_bits_on_one_two_and_three_threads():
    """Each tile is computed whole by one thread, each weight's transform too: the split does not change a bit."""
    torch.manual_seed(0)
    x, weight, b = torch.randn(2, 64, 20, 28), torch.randn(96, 64, 3, 3), torch.randn(96)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(c_winograd.conv3x3(x, weight, b))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_kernel
def test_c_winograd_rejects_mismatched_weights():
    with pytest.raises(ValueError, match=r'conv3x3 takes \(O, 32, 3, 3\) weights'):
        c_winograd.conv3x3(torch.randn(1, 32, 8, 8), torch.randn(16, 48, 3, 3))


@needs_kernel
def test_tokenizer_decodes_by_the_c_kernel_channels_last(cpu_with_fast_kernels, monkeypatch):
    """The published tokenizer's widths (160 and 320 channels) at 64 px: encoder and decoder run channels-last, their
    wide convs by the C kernel; tokens equal the plain path's and images within its tolerance."""
    torch.manual_seed(0)
    calls = []
    real = c_winograd.conv3x3
    monkeypatch.setattr(c_winograd, 'conv3x3', lambda x, *a, **k: calls.append(x.shape[1:]) or real(x, *a, **k))
    vae = convert(VQVAE(vocab_size=64, z_channels=8, ch=160, v_patch_nums=(1, 2, 4), test_mode=True))
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        idx_fast = vae.img_to_idxBl(img)
        rec_fast = vae.idxBl_to_img(idx_fast, same_shape=True, last_one=True)
        assert (160, 64, 64) in calls
        set_fast_paths(False)
        n = len(calls)
        idx_plain = vae.img_to_idxBl(img)
        rec_plain = vae.idxBl_to_img(idx_plain, same_shape=True, last_one=True)
    assert len(calls) == n   # the plain path never calls it
    assert all(torch.equal(a, b) for a, b in zip(idx_fast, idx_plain))
    assert (rec_fast - rec_plain).abs().max() < 1e-3


def test_without_the_c_kernel_nnpack_computes_the_winograd_convs(cpu_with_fast_kernels, monkeypatch, tmp_path):
    """A machine where the kernel cannot be built: describe_choices says why, the convs go by NNPACK, same numbers."""
    if not winograd.nnpack_available():
        pytest.skip('this PyTorch build has no NNPACK for this CPU')
    monkeypatch.setenv('VAR_KERNEL_CACHE', str(tmp_path / 'kernels'))
    monkeypatch.setenv('CC', 'no-such-compiler-here')
    for cached in (native.library, c_winograd._kernels):
        cached.cache_clear()
    try:
        assert "'no-such-compiler-here' not found" in c_winograd.status() or 'AVX-512' in c_winograd.status()
        assert any(line.startswith('Winograd 3x3 conv: on') and 'NNPACK' in line for line in describe_choices())
        nnpack_images = []
        real = torch._nnpack_spatial_convolution
        monkeypatch.setattr(torch, '_nnpack_spatial_convolution', lambda x, *a: nnpack_images.append(x.shape[0]) or real(x, *a))
        conv, x = Conv3x3(128, 128), torch.randn(2, 128, 64, 64)
        with torch.no_grad():
            got = conv(x)
        assert nnpack_images == [1, 1] and relative_error(got, F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)) < 1e-4
    finally:
        for cached in (native.library, c_winograd._kernels):
            cached.cache_clear()


@needs_kernel
def test_describe_choices_names_the_c_kernel(cpu_with_fast_kernels):
    line = next(line for line in describe_choices() if line.startswith('Winograd 3x3 conv'))
    assert line.startswith('Winograd 3x3 conv: on') and 'F(4x4, 3x3) C kernel' in line


@needs_kernel
@pytest.mark.parametrize('B, C, O, h, w', [(2, 64, 48, 6, 10), (1, 160, 160, 40, 36)])
@pytest.mark.parametrize('affine', [True, False])
def test_group_norm_and_silu_read_into_the_conv_equal_the_three_ops(B, C, O, h, w, affine):
    """conv(silu(GroupNorm(x))) with the norm and SiLU applied as the kernel reads its input: the float64 ops' result,
    on an input whose mean is far from zero (the statistics in double)."""
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(32, C, eps=1e-6, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(B, C, h, w) * 3 + 20
    weight, b = torch.randn(O, C, 3, 3) / (3 * C ** 0.5), torch.randn(O)
    with torch.no_grad():
        got = c_winograd.conv3x3(x, weight, b, norm=norm)
        want = F.conv2d(F.silu(F.group_norm(x.double(), 32, *(norm.weight.double(), norm.bias.double()) if affine else (), eps=1e-6)),
                        weight.double(), b.double(), padding=1)
    assert relative_error(got, want) < 3e-5


@needs_kernel
@pytest.mark.parametrize('B, C, O, h, w', [(1, 32, 16, 1, 1), (2, 48, 64, 5, 3), (1, 160, 160, 24, 20)])
def test_upsampling_read_into_the_conv_equals_interpolate_then_conv(B, C, O, h, w):
    torch.manual_seed(0)
    x, weight, b = torch.randn(B, C, h, w), torch.randn(O, C, 3, 3) / (3 * C ** 0.5), torch.randn(O)
    got = c_winograd.conv3x3(x, weight, b, upsample=True)
    want = F.conv2d(F.interpolate(x.double(), scale_factor=2, mode='nearest'), weight.double(), b.double(), padding=1)
    assert got.shape == (B, O, 2 * h, 2 * w) and relative_error(got, want) < 3e-5


@needs_kernel
def test_resnet_block_folds_its_norms_into_the_c_kernel_only_without_active_dropout(cpu_with_fast_kernels, monkeypatch):
    from models.basic_vae import ResnetBlock
    torch.manual_seed(0)
    norms = []
    real = c_winograd.conv3x3
    monkeypatch.setattr(c_winograd, 'conv3x3', lambda x, *a, norm=None, **k: norms.append(norm) or real(x, *a, norm=norm, **k))
    block = convert_tree(ResnetBlock(in_channels=128, out_channels=128, dropout=0.5)).eval()
    x = torch.randn(1, 128, 64, 64)
    with torch.no_grad():
        fast = block(x)
        assert norms == [block.norm1, block.norm2]   # both convs read silu(norm(·)) themselves
        norms.clear()
        with fast_paths(False):
            plain = block(x)
        block.train()
        torch.manual_seed(1)
        dropped = block(x)                           # dropout active: the second conv's input is made in memory
    assert norms == [block.norm1, None]
    assert (fast - plain).abs().max() < 1e-4 * plain.abs().max() and dropped.shape == plain.shape


def test_an_edited_header_rebuilds_the_kernel(tmp_path, monkeypatch):
    """The cache name covers the headers of csrc/ a kernel includes, not only its source."""
    import shutil
    csrc = tmp_path / 'csrc'
    shutil.copytree(native.CSRC, csrc)
    monkeypatch.setattr(native, 'CSRC', csrc)
    monkeypatch.setenv('VAR_KERNEL_CACHE', str(tmp_path / 'kernels'))
    names = []   # the names the library would be built under: all this test needs, nothing is built
    monkeypatch.setattr(native, '_compiler', lambda: ('cc', 'cc 1.0'))
    monkeypatch.setattr(native, '_build', lambda source, target, cc: names.append(target.name) or 'not built by this test')
    native.library.cache_clear()
    try:
        native.library(c_winograd.C_KERNEL)
        (csrc / 'vector_math.h').write_text((csrc / 'vector_math.h').read_text() + '\n/* edited */\n')
        native.library.cache_clear()
        native.library(c_winograd.C_KERNEL)
    finally:
        native.library.cache_clear()
    assert len(names) == 2 and names[0] != names[1]
