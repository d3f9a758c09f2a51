"""The multi-scale VQVAE tokenizer: encoder, quantizer and decoder put together.

Letters: B batch, C = Cvae latent channels, H/W image side, h/w latent side, l = pn² tokens of one scale.
Images are in [-1, 1].
"""
import logging
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .basic_vae import Decoder, Encoder
from .config import PATCH_NUMS_256
from .pretrained import HubMixin
from .quant import VectorQuantizer2
from .state_dict import check_state_dict

__all__ = ['VQVAE']

logger = logging.getLogger(__name__)

class VQVAE(nn.Module, HubMixin, weights_kind='vae'):
    def __init__(
        self, vocab_size=4096, z_channels=32, ch=128, dropout=0.0,
        beta=0.25,              # commitment loss weight
        using_znorm=False,      # whether to normalize when computing the nearest neighbors
        quant_conv_ks=3,        # quant conv kernel size
        quant_resi=0.5,         # 0.5 means \phi(x) = 0.5conv(x) + (1-0.5)x
        share_quant_resi=4,     # use 4 \phi layers for K scales: partially-shared \phi
        default_qresi_counts=0,  # if is 0: automatically set to len(v_patch_nums)
        v_patch_nums=PATCH_NUMS_256,  # number of patches for each scale, h_{1 to K} = w_{1 to K} = v_patch_nums[k]
        test_mode=True,
    ):
        super().__init__()
        self.test_mode = test_mode
        self.V, self.Cvae = vocab_size, z_channels
        ddconfig = dict(dropout=dropout, ch=ch, z_channels=z_channels, in_channels=3, ch_mult=(1, 1, 2, 2, 4),
                        num_res_blocks=2, using_sa=True, using_mid_sa=True)
        self.ch = ch
        self.encoder = Encoder(double_z=False, **ddconfig)
        self.decoder = Decoder(**ddconfig)

        self.vocab_size = vocab_size
        self.downsample = 2 ** (len(ddconfig['ch_mult']) - 1)
        self.quantize = VectorQuantizer2(
            vocab_size=vocab_size, Cvae=self.Cvae, using_znorm=using_znorm, beta=beta,
            default_qresi_counts=default_qresi_counts, v_patch_nums=v_patch_nums,
            quant_resi=quant_resi, share_quant_resi=share_quant_resi,
        )
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, quant_conv_ks, stride=1, padding=quant_conv_ks // 2)

        if self.test_mode:
            self.eval()
            for p in self.parameters():
                p.requires_grad_(False)

    def encode(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → latent f (B, Cvae, h, w) before quantisation."""
        return self.quant_conv(self.encoder(img_B3HW))

    def decode(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Quantised latent f_hat (B, Cvae, h, w) → image (B, 3, H, W), not clamped."""
        return self.decoder(self.post_quant_conv(f_hat_BChw))

    @property
    def img_size(self) -> int:
        """Side in pixels of the images this tokenizer's scale list covers."""
        return self.quantize.v_patch_nums[-1] * self.downsample

    def check_img(self, img_B3HW: torch.Tensor, v_patch_nums: Optional[Sequence] = None) -> None:
        """Raise ValueError unless img is (B, 3, H, W) with H, W the last scale times the downsampling."""
        pn = (v_patch_nums or self.quantize.v_patch_nums)[-1]
        ph, pw = (pn, pn) if isinstance(pn, int) else pn
        want = (ph * self.downsample, pw * self.downsample)
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != 3 or tuple(img_B3HW.shape[-2:]) != want:
            raise ValueError(
                f'cannot tokenise images of shape {tuple(img_B3HW.shape)}: with the last scale {ph}x{pw} and '
                f'downsampling {self.downsample}, images must be (B, 3, {want[0]}, {want[1]}); '
                f'resize or crop them, or build the tokenizer with another patch_nums')

    # ------------------------------------------------------------------ training
    def forward(self, inp_B3HW: torch.Tensor, ret_usages: bool = False):
        """Reconstruct for tokenizer training: (B, 3, H, W) → (reconstruction (B, 3, H, W), usages, vq loss)."""
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(inp_B3HW)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    # ------------------------------------------------------------------ inference
    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, h, w) → image (B, 3, H, W) in [-1, 1]."""
        return self.decode(f_hat).clamp_(-1, 1)

    def img_to_idxBl(self, inp_img_no_grad: torch.Tensor, v_patch_nums=None) -> List[torch.LongTensor]:
        """Image (B, 3, H, W) → list of token maps (B, pn²), coarse to fine."""
        self.check_img(inp_img_no_grad, v_patch_nums)
        f = self.encode(inp_img_no_grad)
        return self.quantize.f_to_idxBl_or_fhat(f, to_fhat=False, v_patch_nums=v_patch_nums)

    def idxBl_to_img(self, ms_idx_Bl: List[torch.Tensor], same_shape: bool, last_one=False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Token maps (B, pn²) of all scales → image(s) (B, 3, H, W) in [-1, 1]; all partial sums unless last_one."""
        B = ms_idx_Bl[0].shape[0]
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(self.quantize.embedding(idx_Bl).transpose(1, 2).view(B, self.Cvae, pn, pn))
        return self.embed_to_img(ms_h_BChw=ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)

    def embed_to_img(self, ms_h_BChw: List[torch.Tensor], all_to_max_scale: bool, last_one=False
                     ) -> Union[List[torch.Tensor], torch.Tensor]:
        if last_one:
            return self.fhat_to_img(self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=True))
        return [self.fhat_to_img(f_hat) for f_hat in self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=all_to_max_scale, last_one=False)]

    def img_to_reconstructed_img(self, x: torch.Tensor, v_patch_nums=None, last_one=False
                                 ) -> Union[List[torch.Tensor], torch.Tensor]:
        """Image (B, 3, H, W) → its reconstruction from all scales (last_one) or from every prefix of scales."""
        self.check_img(x, v_patch_nums)
        f = self.encode(x)
        ls_f_hat_BChw = self.quantize.f_to_idxBl_or_fhat(f, to_fhat=True, v_patch_nums=v_patch_nums)
        if last_one:
            return self.fhat_to_img(ls_f_hat_BChw[-1])
        return [self.fhat_to_img(f_hat) for f_hat in ls_f_hat_BChw]

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As nn.Module's, with a readable error for wrong keys or shapes.

        `quantize.ema_vocab_hit_SV` holds codebook-usage statistics only: a checkpoint made with another
        number of scales keeps this model's buffer instead.
        """
        state_dict = dict(state_dict)
        key = 'quantize.ema_vocab_hit_SV'
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            logger.info('%s has shape %s in the checkpoint and %s here (another number of scales); keeping this '
                        'model\'s statistics', key, tuple(state_dict[key].shape), tuple(self.quantize.ema_vocab_hit_SV.shape))
            state_dict[key] = self.quantize.ema_vocab_hit_SV.clone()
        if strict:
            check_state_dict(self, state_dict, kind='vae')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
