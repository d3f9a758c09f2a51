"""Convolutional encoder and decoder of the multi-scale VQVAE (the latent-diffusion "vq-f16" net).

Letters: B batch, C channels, h/w height/width of a feature map, L = h·w positions.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['Encoder', 'Decoder', 'ResnetBlock', 'AttnBlock', 'Upsample2x', 'Downsample2x', 'Normalize', 'conv3x3']


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3×3 conv with stride 1 and zero padding 1: the map keeps its size."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    if in_channels % num_groups != 0:
        raise ValueError(f'GroupNorm with {num_groups} groups needs a channel count divisible by {num_groups}, '
                         f'got {in_channels}: choose the tokenizer width `ch` as a multiple of 32')
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = conv3x3(in_channels, in_channels)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode='nearest'))  # B, C, 2h, 2w


class Downsample2x(nn.Module):
    """Pad right and bottom by one zero, then a 3×3 stride-2 conv without padding."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, pad=(0, 1, 0, 1), mode='constant', value=0))  # B, C, h/2, w/2


class ResnetBlock(nn.Module):
    """norm1, SiLU, conv1, norm2, SiLU, dropout, conv2, plus a 1×1 shortcut when the width changes."""

    def __init__(self, *, in_channels: int, out_channels: int = None, dropout: float = 0.0):
        super().__init__()
        self.in_channels = in_channels
        out_channels = in_channels if out_channels is None else out_channels
        self.out_channels = out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()   # the norm's output is not needed again
        h_BChw = self.conv1(F.silu(self.norm1(x_BChw), inplace=inplace))
        h_BChw = self.conv2(self.dropout(F.silu(self.norm2(h_BChw), inplace=inplace)))
        return self.nin_shortcut(x_BChw) + h_BChw


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, with a residual."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.C = in_channels
        self.norm = Normalize(in_channels)
        self.qkv = nn.Conv2d(in_channels, 3 * in_channels, kernel_size=1, stride=1, padding=0)
        self.w_ratio = int(in_channels) ** (-0.5)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

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

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
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
        self.conv_out = nn.Conv2d(block_in, (2 * z_channels if double_z else z_channels), kernel_size=3, stride=1, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
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
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

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
        self.conv_out = conv3x3(block_in, in_channels)   # to RGB

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
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
