"""The tokenizer converted by cpu_kernels: its CPU paths compute what the plain modules compute, images in groups."""
import torch

from conftest import build_tiny
from cpu_kernels import fast_paths, memory, set_fast_paths, tokenizer
from cpu_kernels.convert import convert_tree
from cpu_kernels.memory import channels_last_pays
from models.basic_vae import Upsample2x


def test_fast_conv_paths_equal_the_plain_ones(monkeypatch):
    """Channels-last convs and polyphase upsampling compute what the reference's plain ops compute."""
    torch.manual_seed(0)
    up = convert_tree(Upsample2x(32))
    x = torch.randn(2, 32, 5, 7)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx = x.contiguous(memory_format=fmt)
        fast = up(xx)
        with fast_paths(False):
            assert torch.allclose(fast, up(xx), atol=1e-5) and fast.shape == (2, 32, 10, 14)
    vae, _ = build_tiny(fast=True)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    img_before = img.clone()
    with torch.no_grad():
        set_fast_paths(True)
        assert not channels_last_pays(vae.ch)   # a narrow tokenizer keeps NCHW ...
        monkeypatch.setattr(tokenizer, 'channels_last_pays', lambda ch: True)   # ... force it here to test the path
        f_fast, rec_fast = vae.quant_conv(vae.encoder(img)), vae.img_to_reconstructed_img(img, last_one=True)
        set_fast_paths(False)
        f_ref, rec_ref = vae.quant_conv(vae.encoder(img)), vae.img_to_reconstructed_img(img, last_one=True)
    assert (f_fast - f_ref).abs().max() < 1e-4 and (rec_fast - rec_ref).abs().max() < 1e-3
    assert f_fast.is_contiguous() and rec_fast.is_contiguous()
    assert torch.equal(img, img_before)   # the in-place inference ops touch only their own activations


def test_cpu_tokenising_goes_in_groups_of_images_with_the_same_tokens(monkeypatch):
    """Without autograd on the CPU the encoder sees groups of images under the byte budget; tokens are those of the whole batch."""
    vae, _ = build_tiny(fast=True)
    img = torch.rand(5, 3, 64, 64) * 2 - 1
    batch_sizes = []
    hook = vae.encoder.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    with torch.no_grad():
        whole = vae.img_to_idxBl(img)
        assert batch_sizes == [5]   # the tiny tokenizer's activations fit the default budget: one call
        per_image_bytes = vae.ch * 64 * 64 * 4
        monkeypatch.setattr(memory, 'CPU_CHUNK_BYTES', 2 * per_image_bytes)
        batch_sizes.clear()
        grouped = vae.img_to_idxBl(img)
        assert batch_sizes == [2, 2, 1]
        batch_sizes.clear()
        set_fast_paths(False)
        plain = vae.img_to_idxBl(img)
        assert batch_sizes == [5]   # the reference's path: the batch goes through whole
    batch_sizes.clear()
    set_fast_paths(True)
    f = vae.encode(img)   # with autograd (tokenizer training) the batch goes through whole as well
    assert batch_sizes == [5] and f.shape == (5, vae.Cvae, 4, 4)
    hook.remove()
    for a, b, c in zip(whole, grouped, plain):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_cpu_decoding_goes_in_groups_of_images_with_the_same_pixels(monkeypatch):
    """Without autograd on the CPU the decoder sees groups of images under the byte budget, with the pixels of the whole batch."""
    vae, _ = build_tiny(fast=True)
    f_hat = torch.randn(3, vae.Cvae, 4, 4)
    batch_sizes = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, args: batch_sizes.append(args[0].shape[0]))
    with torch.no_grad():
        whole = vae.fhat_to_img(f_hat)
        monkeypatch.setattr(memory, 'CPU_CHUNK_BYTES', 2 * vae.ch * 64 * 64 * 4)
        grouped = vae.fhat_to_img(f_hat)
    assert batch_sizes == [3, 2, 1]
    assert whole.shape == grouped.shape == (3, 3, 64, 64) and (whole - grouped).abs().max() < 1e-5
    batch_sizes.clear()
    vae.decode(f_hat)   # with autograd (tokenizer training) the batch goes through whole
    assert batch_sizes == [3]
    hook.remove()
