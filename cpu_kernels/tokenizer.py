"""The tokenizer's modules with this package's CPU paths: subclasses of models/basic_vae.py's, models/quant.py's and
models/vqvae.py's, the same parameters, buffers and state-dict keys, that `convert` swaps in (in place).

Each forward computes what its plain parent's does, up to float rounding:

    Conv2d           oneDNN's conv in CPU float32 inference whatever the batch size: an image's result does not
                     depend on its batch (conv.py; on whatever the switch says)
    Conv3x3          the ResnetBlock's, Upsample2x's and the decoder's to-RGB 3×3 convs: Winograd for wide maps,
                     by taps for a few output channels (winograd.py, narrow_conv.py)
    Phi              the quantizer's residual conv, batch-invariant as Conv2d
    ResnetBlock      norm, SiLU and conv in one pass where the conv goes by the C Winograd kernel; the residual
                     added in place without autograd (winograd.py, memory.py)
    Upsample2x       nearest ×2 + 3×3 conv by phases on the small input, or read upsampled by the C kernel (upsample.py)
    Encoder, Decoder the input in the memory layout the convs run fastest on (memory.py)
    VQVAE            encode and decode in groups of images under a byte budget, activations from the heap (memory.py)

Letters: B batch, C channels, h/w height/width, H/W image height/width.
"""
import torch

from models import basic_vae, quant, vqvae

from .conv import BatchInvariantConv, Conv2d
from .memory import channels_last_pays, in_image_groups, residual_add, to_conv_layout
from .upsample import upsample2x_conv3x3
from .winograd import Conv3x3, norm_silu_conv3x3

__all__ = ['Conv2d', 'Conv3x3', 'Phi', 'ResnetBlock', 'Upsample2x', 'Encoder', 'Decoder', 'VQVAE']


def as_conv3x3(conv: torch.nn.Conv2d) -> None:
    """Make a plain 3×3 conv (stride 1, padding 1) a Conv3x3, in place."""
    if type(conv) is torch.nn.Conv2d:
        conv.__class__ = Conv3x3


class Phi(BatchInvariantConv, quant.Phi):
    """quant.Phi whose conv is batch-invariant (conv.py)."""


class ResnetBlock(basic_vae.ResnetBlock):
    """ResnetBlock by winograd.norm_silu_conv3x3 and memory.residual_add; its two 3×3 convs are Conv3x3s."""

    @classmethod
    def adopt(cls, block: basic_vae.ResnetBlock) -> None:
        block.__class__ = cls
        as_conv3x3(block.conv1)
        as_conv3x3(block.conv2)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        # conv(dropout(silu(norm(x)))), in one pass where the conv allows (winograd.py)
        h_BChw = norm_silu_conv3x3(x_BChw, self.norm1, self.conv1)
        h_BChw = norm_silu_conv3x3(h_BChw, self.norm2, self.conv2, self.dropout)
        return residual_add(self.nin_shortcut(x_BChw), h_BChw)   # in place into h without autograd (memory.py)


class Upsample2x(basic_vae.Upsample2x):
    """Upsample2x by upsample.upsample2x_conv3x3; its conv is a Conv3x3."""

    @classmethod
    def adopt(cls, up: basic_vae.Upsample2x) -> None:
        up.__class__ = cls
        as_conv3x3(up.conv)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return upsample2x_conv3x3(x_BChw, self.conv.weight, self.conv.bias)  # B, C, 2h, 2w


class Encoder(basic_vae.Encoder):
    """Encoder whose input goes into the layout its convs run fastest on (channels-last for wide tokenizers)."""

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return super().forward(to_conv_layout(x_B3HW, self.ch, channels_last_pays(self.ch)))


class Decoder(basic_vae.Decoder):
    """Decoder whose input goes into the layout its convs run fastest on; its conv to RGB is a Conv3x3 (by taps)."""

    @classmethod
    def adopt(cls, dec: basic_vae.Decoder) -> None:
        dec.__class__ = cls
        as_conv3x3(dec.conv_out)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        return super().forward(to_conv_layout(z_BChw, self.ch, channels_last_pays(self.ch)))


class VQVAE(vqvae.VQVAE):
    """VQVAE whose encode and decode go in groups of images in CPU inference (memory.in_image_groups)."""

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → latent f (B, Cvae, h, w); in groups of images on the CPU without autograd."""
        return in_image_groups(super().encode, img_B3HW, self.ch, *img_B3HW.shape[-2:])

    def decode(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Quantised latent f_hat (B, Cvae, h, w) → image (B, 3, H, W); in groups of images on the CPU without autograd."""
        H, W = (s * self.downsample for s in f_hat_BChw.shape[-2:])
        return in_image_groups(super().decode, f_hat_BChw, self.ch, H, W)
