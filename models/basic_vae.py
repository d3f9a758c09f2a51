"""Convolutional encoder and decoder of the multi-scale VQVAE (the latent-diffusion "vq-f16" net).

Letters: B batch, C channels, h/w height/width of a feature map, L = h·w positions.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_conv import Conv2d, conv2d
from .winograd import WINOGRAD_MIN_CHANNELS, Conv3x3, winograd_applies

__all__ = ['Encoder', 'Decoder', 'ResnetBlock', 'AttnBlock', 'Upsample2x', 'Downsample2x', 'Normalize']


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    if in_channels % num_groups != 0:
        raise ValueError(f'GroupNorm with {num_groups} groups needs a channel count divisible by {num_groups}, '
                         f'got {in_channels}: choose the tokenizer width `ch` as a multiple of 32')
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def _phase_kernels(w_OI33: torch.Tensor):
    """The four 2×2 kernels (a, b) with conv3×3(nearest×2(x))[2i+a, 2j+b] = conv2×2_ab(x) at (i, j).

    Along each axis, output parity 0 reads input offsets (−1, 0) with taps (w0, w1 + w2), parity 1 reads
    offsets (0, +1) with taps (w0 + w1, w2).
    """
    def split(t, dim):
        w0, w1, w2 = t.unbind(dim)
        return torch.stack((w0, w1 + w2), dim), torch.stack((w0 + w1, w2), dim)
    rows = split(w_OI33, 2)
    return {(a, b): col for a in (0, 1) for b, col in enumerate(split(rows[a], 3))}


class Upsample2x(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv.

    With `polyphase` (the default) the same result is computed as four 2×2 convs on the small input,
    interleaved: 2.25× fewer multiply-adds, equal up to float rounding (the taps are summed first).
    Where the 3×3 conv at the large size goes by Winograd (CPU inference, see winograd.py) it costs
    fewer multiply-adds than that (1.78 per output instead of 4), so that path upsamples first.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = Conv3x3(in_channels, in_channels)
        self.polyphase = True

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        if not self.polyphase or self.conv.uses_winograd(x_BChw, (2 * h, 2 * w)):
            return self.conv(F.interpolate(x_BChw, scale_factor=2, mode='nearest'))  # B, C, 2h, 2w
        kernels = _phase_kernels(self.conv.weight)
        x_pad = F.pad(x_BChw, (1, 1, 1, 1))
        O = self.conv.weight.shape[0]
        if x_BChw.is_contiguous(memory_format=torch.channels_last) and not x_BChw.is_contiguous():
            out_BhawbO = x_BChw.new_empty(B, h, 2, w, 2, O)
            for (a, b), k in kernels.items():
                out_BhawbO[:, :, a, :, b] = conv2d(x_pad[:, :, a:a + h + 1, b:b + w + 1], k, self.conv.bias).permute(0, 2, 3, 1)
            return out_BhawbO.view(B, 2 * h, 2 * w, O).permute(0, 3, 1, 2)  # channels-last B, O, 2h, 2w
        out_BOhawb = x_BChw.new_empty(B, O, h, 2, w, 2)
        for (a, b), k in kernels.items():
            out_BOhawb[:, :, :, a, :, b] = conv2d(x_pad[:, :, a:a + h + 1, b:b + w + 1], k, self.conv.bias)
        return out_BOhawb.view(B, O, 2 * h, 2 * w)


class Downsample2x(nn.Module):
    """Pad right and bottom by one zero, then a 3×3 stride-2 conv without padding."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, pad=(0, 1, 0, 1), mode='constant', value=0))  # B, C, h/2, w/2


CHANNELS_LAST_MIN_WIDTH = 64


def channels_last_pays(ch: int) -> bool:
    """Channels-last convs pay off for wide tokenizers (published ch=160 on a CPU: 1.12-1.16x for the encoder,
    1.21-1.24x for the decoder); at ch=32 they made bf16 training 2.3x slower on a CPU (oneDNN reorders
    dominate), so narrow tokenizers keep NCHW."""
    return ch >= CHANNELS_LAST_MIN_WIDTH


def _to_conv_layout(net: nn.Module, x_BChw: torch.Tensor) -> torch.Tensor:
    """The encoder's or decoder's input in the memory layout its convs run fastest on: NCHW where the wide ones go
    by Winograd (NNPACK reads NCHW), else channels-last where that pays."""
    if net.winograd and net.ch >= WINOGRAD_MIN_CHANNELS and winograd_applies(x_BChw):
        return x_BChw.contiguous()
    if net.channels_last:
        return x_BChw.contiguous(memory_format=torch.channels_last)
    return x_BChw


class ResnetBlock(nn.Module):
    """norm1, SiLU, conv1, norm2, SiLU, dropout, conv2, plus a 1×1 shortcut when the width changes."""

    def __init__(self, *, in_channels: int, out_channels: int = None, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv3x3(in_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.inplace = True   # in-place residual add when autograd is off (VQVAE.set_fast_paths)
        self.conv2 = Conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        # Without autograd the SiLUs run in place on the norms' fresh outputs, as in the reference; with it they
        # allocate (autograd needs their inputs). The in-place residual add is this code's (`inplace`).
        no_grad = not torch.is_grad_enabled()
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw), inplace=no_grad))
        h_BChw = self.conv2(self.dropout(F.silu(self.norm2(h_BChw), inplace=no_grad)))
        if self.inplace and no_grad:   # same values, one full-size activation fewer alive at a time
            return h_BChw.add_(self.nin_shortcut(x_BChw))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, with a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = Conv2d(in_channels, 3 * in_channels, kernel_size=1, stride=1, padding=0)
        self.w_ratio = int(in_channels) ** (-0.5)
        self.proj_out = Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        qkv_B3Chw = self.qkv(self.norm(x_BChw))
        B, _, H, W = qkv_B3Chw.shape
        C = self.C
        q_BChw, k_BChw, v_BChw = qkv_B3Chw.reshape(B, 3, C, H, W).unbind(1)
        q_BLC = q_BChw.reshape(B, C, H * W).permute(0, 2, 1)
        k_BCL = k_BChw.reshape(B, C, H * W)
        w_BLL = torch.bmm(q_BLC, k_BCL).mul_(self.w_ratio).softmax(dim=2)  # w[b, i, j]: query i attends to key j
        v_BCL = v_BChw.reshape(B, C, H * W)
        h_BCL = torch.bmm(v_BCL, w_BLL.permute(0, 2, 1))
        return x_BChw + self.proj_out(h_BCL.view(B, C, H, W))


def _make_attn(in_channels: int, using_sa: bool) -> nn.Module:
    return AttnBlock(in_channels) if using_sa else nn.Identity()


class Encoder(nn.Module):
    """Image (B, 3, H, W) → latent (B, z_channels, H/2^(levels-1), W/2^(levels-1))."""

    def __init__(self, *, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels, double_z=False, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.downsample_ratio = 2 ** (self.num_resolutions - 1)
        self.num_res_blocks = num_res_blocks
        self.in_channels = in_channels

        self.conv_in = Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(_make_attn(block_in, using_sa=True))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = _make_attn(block_in, using_sa=using_mid_sa)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, (2 * z_channels if double_z else z_channels), kernel_size=3, stride=1, padding=1)
        self.channels_last = channels_last_pays(ch)   # run the convs on channels-last activations
        self.winograd = True   # its wide 3×3 convs by Winograd in CPU inference (Conv3x3), on NCHW activations

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        x_B3HW = _to_conv_layout(self, x_B3HW)
        h = self.conv_in(x_B3HW)
        for i_level in range(self.num_resolutions):
            level = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())).contiguous()  # B, z_channels, h, w


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) → image (B, 3, h·2^(levels-1), w·2^(levels-1)), not clamped."""

    def __init__(self, *, ch=128, ch_mult=(1, 2, 4, 8), num_res_blocks=2, dropout=0.0, in_channels=3,
                 z_channels, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.in_channels = in_channels

        block_in = ch * ch_mult[self.num_resolutions - 1]
        self.conv_in = Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = _make_attn(block_in, using_sa=using_mid_sa)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if i_level == self.num_resolutions - 1 and using_sa:
                    attn.append(_make_attn(block_in, using_sa=True))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)  # keep the checkpoint's order: up[0] is the finest level

        self.norm_out = Normalize(block_in)
        self.conv_out = Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)
        self.channels_last = channels_last_pays(ch)   # run the convs on channels-last activations
        self.winograd = True   # its wide 3×3 convs by Winograd in CPU inference (Conv3x3), on NCHW activations

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        z_BChw = _to_conv_layout(self, z_BChw)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())).contiguous()  # B, 3, H, W
