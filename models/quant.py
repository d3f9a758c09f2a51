"""Multi-scale residual vector quantizer of VAR (VectorQuantizer2) and its phi convolutions.

Letters: B batch, C = Cvae latent channels, H/W side of the full latent map, h/w (or pn) side of
one scale's token map, N = B·h·w positions, V vocabulary, SN number of scales, si scale index,
l = pn² tokens of one scale, L tokens of all scales.
"""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['VectorQuantizer2', 'Phi', 'PhiShared', 'PhiPartiallyShared', 'PhiNonShared']


class Phi(nn.Conv2d):
    """phi(h) = (1 − r)·h + r·conv3×3(h)."""

    def __init__(self, embed_dim: int, quant_resi: float):
        ks = 3
        super().__init__(in_channels=embed_dim, out_channels=embed_dim, kernel_size=ks, stride=1, padding=ks // 2)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def _ticks(K: int) -> np.ndarray:
    """Positions in [0, 1] of K phi convs; a scale uses the conv whose tick is nearest to si/(SN−1)."""
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


class PhiShared(nn.Module):
    """share_quant_resi = 1: one conv for all scales (keys `quant_resi.qresi.*`)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _at_from_0_to_1: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """share_quant_resi = n ≥ 2: n convs shared by neighbouring scales (keys `quant_resi.qresi_ls.i.*`)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = _ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[np.argmin(np.abs(self.ticks - at_from_0_to_1)).item()]

    def extra_repr(self) -> str:
        return f'ticks={self.ticks}'


class PhiNonShared(nn.ModuleList):
    """share_quant_resi = 0: one conv per scale (keys `quant_resi.i.*`)."""

    def __init__(self, qresi: List[nn.Module]):
        super().__init__(qresi)
        self.ticks = _ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(np.argmin(np.abs(self.ticks - at_from_0_to_1)).item())

    def extra_repr(self) -> str:
        return f'ticks={self.ticks}'


class VectorQuantizer2(nn.Module):
    """Encodes a latent map into a pyramid of token maps (coarse to fine) and back."""

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float = 0.25,
                 default_qresi_counts: int = 0, v_patch_nums: Sequence[int] = None,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        if v_patch_nums is None or len(v_patch_nums) == 0:
            raise ValueError('VectorQuantizer2 needs v_patch_nums, the side of every scale, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)')
        if share_quant_resi < 0:
            raise ValueError(f'share_quant_resi must be 0 (one phi per scale), 1 (one shared phi) or n >= 2 (n partially shared phis), got {share_quant_resi}')
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.using_znorm = using_znorm
        self.v_patch_nums = tuple(v_patch_nums)

        self.quant_resi_ratio = quant_resi

        def new_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([new_phi() for _ in range(default_qresi_counts or len(self.v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(new_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([new_phi() for _ in range(share_quant_resi)]))

        # codebook-usage statistics only: loading a checkpoint with another number of scales is allowed
        self.register_buffer('ema_vocab_hit_SV', torch.full((len(self.v_patch_nums), self.vocab_size), fill_value=0.0))
        self.record_hit = 0

        self.beta = beta
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)

    def extra_repr(self) -> str:
        return f'{self.v_patch_nums}, znorm={self.using_znorm}, beta={self.beta}  |  S={len(self.v_patch_nums)}, quant_resi={self.quant_resi_ratio}'

    # ------------------------------------------------------------------ nearest codebook entry
    def _nearest_idx(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the codebook entry nearest to every row (least squared L2; greatest cosine with znorm)."""
        E_VC = self.embedding.weight.data
        if self.using_znorm:
            z_NC = F.normalize(z_NC, dim=-1)
            return torch.argmax(z_NC @ F.normalize(E_VC.T, dim=0), dim=1)
        d_NV = torch.sum(z_NC.square(), dim=1, keepdim=True) + torch.sum(E_VC.square(), dim=1, keepdim=False)
        d_NV.addmm_(z_NC, E_VC.T, alpha=-2, beta=1)  # ‖z‖² + ‖e‖² − 2 z·e
        return torch.argmin(d_NV, dim=1)

    @staticmethod
    def _patch_hws(v_patch_nums: Sequence[Union[int, Tuple[int, int]]]) -> List[Tuple[int, int]]:
        return [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in v_patch_nums]

    # ------------------------------------------------------------------ training forward
    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False):
        """Quantize for tokenizer training.

        f_BChw (B, C, H, W) → (f_hat with straight-through gradient (B, C, H, W),
        usages per scale in % or None, mean vq loss over scales).
        """
        dtype = f_BChw.dtype
        if dtype != torch.float32:
            f_BChw = f_BChw.float()
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        patch_hws = self._patch_hws(self.v_patch_nums)
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the latent map is {H}x{W} but the last scale is {patch_hws[-1][0]}x{patch_hws[-1][1]}')

        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            mean_vq_loss = f_BChw.new_zeros(())
            SN = len(patch_hws)
            distributed = self.training and tdist.is_available() and tdist.is_initialized()
            for si, (ph, pw) in enumerate(patch_hws):
                z_BChw = F.interpolate(f_rest, size=(ph, pw), mode='area') if si != SN - 1 else f_rest
                idx_N = self._nearest_idx(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))

                if self.training:
                    hit_V = idx_N.bincount(minlength=self.vocab_size).float()
                    if distributed:
                        tdist.all_reduce(hit_V)
                    if self.record_hit == 0:
                        self.ema_vocab_hit_SV[si].copy_(hit_V)
                    elif self.record_hit < 100:
                        self.ema_vocab_hit_SV[si].mul_(0.9).add_(hit_V.mul(0.1))
                    else:
                        self.ema_vocab_hit_SV[si].mul_(0.99).add_(hit_V.mul(0.01))

                h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
                if si != SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode='bicubic')
                h_BChw = self.quant_resi[si / (SN - 1)](h_BChw.contiguous())
                f_hat = f_hat + h_BChw
                f_rest = f_rest - h_BChw.detach()
                mean_vq_loss = mean_vq_loss + F.mse_loss(f_hat.detach(), f_BChw).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
            if self.training:
                self.record_hit += 1
            mean_vq_loss = mean_vq_loss / SN
            f_hat = (f_hat.detach() - f_no_grad).add_(f_BChw)  # straight-through: the decoder's gradient reaches f

        usages = self.usages_percent(B * H * W) if ret_usages else None
        return f_hat.to(dtype), usages, mean_vq_loss

    def usages_percent(self, positions_per_batch: int) -> List[float]:
        """Per scale, the % of codebook entries whose EMA hit count exceeds 8% of a uniform share."""
        world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
        margin = world * positions_per_batch / self.vocab_size * 0.08
        return [(self.ema_vocab_hit_SV[si] >= margin).float().mean().item() * 100 for si in range(len(self.v_patch_nums))]

    # ------------------------------------------------------------------ token maps ↔ latents
    def embed_to_fhat(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False):
        """Sum the phi-refined embeddings of every scale (coarse to fine) into f_hat (B, C, H, W)."""
        ls_f_hat_BChw = []
        B = ms_h_BChw[0].shape[0]
        H = W = self.v_patch_nums[-1]
        SN = len(self.v_patch_nums)
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                h_BChw = ms_h_BChw[si]
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode='bicubic')
                h_BChw = self.quant_resi[si / (SN - 1)](h_BChw)
                f_hat.add_(h_BChw)
                if last_one:
                    ls_f_hat_BChw = f_hat
                else:
                    ls_f_hat_BChw.append(f_hat.clone())
        else:
            # every partial sum at its own scale (not how the tokenizer is trained or sampled)
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, self.v_patch_nums[0], self.v_patch_nums[0], dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode='bicubic')
                h_BChw = self.quant_resi[si / (SN - 1)](ms_h_BChw[si])
                f_hat.add_(h_BChw)
                if last_one:
                    ls_f_hat_BChw = f_hat
                else:
                    ls_f_hat_BChw.append(f_hat)
        return ls_f_hat_BChw

    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool,
                           v_patch_nums: Optional[Sequence[Union[int, Tuple[int, int]]]] = None) -> List[torch.Tensor]:
        """Encode f (B, C, H, W): per scale, the index map (B, ph·pw) or, with to_fhat, the running f_hat (B, C, H, W)."""
        B, C, H, W = f_BChw.shape
        f_no_grad = f_BChw.detach().float()   # nearest entries in float32, also under autocast
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)

        f_hat_or_idx_Bl: List[torch.Tensor] = []
        patch_hws = self._patch_hws(v_patch_nums or self.v_patch_nums)
        if patch_hws[-1] != (H, W):
            raise ValueError(f'the latent map is {H}x{W} but the last scale is {patch_hws[-1][0]}x{patch_hws[-1][1]}: '
                             f'images must be {patch_hws[-1][0]}x{patch_hws[-1][1]} times the tokenizer downsampling')

        SN = len(patch_hws)
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            for si, (ph, pw) in enumerate(patch_hws):
                z_BChw = F.interpolate(f_rest, size=(ph, pw), mode='area') if si != SN - 1 else f_rest
                idx_N = self._nearest_idx(z_BChw.permute(0, 2, 3, 1).reshape(-1, C))
                h_BChw = self.embedding(idx_N.view(B, ph, pw)).permute(0, 3, 1, 2)
                if si != SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode='bicubic')
                h_BChw = self.quant_resi[si / (SN - 1)](h_BChw.contiguous())
                f_hat.add_(h_BChw)
                f_rest.sub_(h_BChw)
                f_hat_or_idx_Bl.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return f_hat_or_idx_Bl

    # ------------------------------------------------------------------ transformer input
    def idxBl_to_var_input(self, gt_ms_idx_Bl: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """Token maps (B, pn²) of the first n scales → teacher-forcing input (B, L − first_l, C) of scales 1..n−1:
        each scale's f_hat at the next side. n is all scales, or a progressive stage + 1; None for n = 1."""
        SN, n = len(self.v_patch_nums), len(gt_ms_idx_Bl)
        if not 1 <= n <= SN:
            raise ValueError(f'{n} token maps given: expected 1 to {SN}, the first scales of {self.v_patch_nums}')
        next_scales = []
        B = gt_ms_idx_Bl[0].shape[0]
        C = self.Cvae
        H = W = self.v_patch_nums[-1]

        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, H, W, dtype=torch.float32)
        pn_next = self.v_patch_nums[0]
        for si in range(n - 1):
            h_BChw = F.interpolate(self.embedding(gt_ms_idx_Bl[si]).transpose_(1, 2).view(B, C, pn_next, pn_next),
                                   size=(H, W), mode='bicubic')
            f_hat.add_(self.quant_resi[si / (SN - 1)](h_BChw))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode='area').view(B, C, -1).transpose(1, 2))
        return torch.cat(next_scales, dim=1) if len(next_scales) else None

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
                                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Add scale si's map h (B, C, pn, pn) to f_hat (B, C, H, W) in place; return f_hat and the next scale's input map."""
        HW = self.v_patch_nums[-1]
        if si != SN - 1:
            h = self.quant_resi[si / (SN - 1)](F.interpolate(h_BChw, size=(HW, HW), mode='bicubic'))
            f_hat.add_(h)
            return f_hat, F.interpolate(f_hat, size=(self.v_patch_nums[si + 1], self.v_patch_nums[si + 1]), mode='area')
        h = self.quant_resi[si / (SN - 1)](h_BChw)
        f_hat.add_(h)
        return f_hat, f_hat
