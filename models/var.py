"""The VAR transformer: next-scale prediction of token maps with class-conditional AdaLN blocks.

Letters (capital = all scales, lower = one scale): B batch, L tokens of all scales, l tokens of one
scale, C width, D condition width (= C), V vocabulary, Cv = Cvae latent channels, pn side of one
scale's token map, SN number of scales, si scale index (0 = coarsest), H heads.
"""
import logging
import math
from functools import partial
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import BACKENDS, BlockCausal, choose_backend, describe_backends
from .basic_var import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin
from .config import PATCH_NUMS_256
from .pretrained import HubMixin
from . import sampling
from .state_dict import check_state_dict
from .vqvae import VQVAE

__all__ = ['VAR']

logger = logging.getLogger(__name__)

LabelArg = Union[None, int, Sequence[int], torch.Tensor]


class VAR(nn.Module, HubMixin, weights_kind='var'):
    def __init__(
        self, vae_local: VQVAE,
        num_classes=1000, depth=16, embed_dim=1024, num_heads=16, mlp_ratio=4., drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
        norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1,
        attn_l2_norm=False,
        patch_nums=PATCH_NUMS_256,   # 10 steps by default
        flash_if_available=True, fused_if_available=True,
    ):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        if tuple(patch_nums) != tuple(vae_local.quantize.v_patch_nums):
            raise ValueError(f'VAR patch_nums {tuple(patch_nums)} differ from the tokenizer\'s {tuple(vae_local.quantize.v_patch_nums)}')
        self.Cvae, self.V = vae_local.Cvae, vae_local.vocab_size
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads

        self.cond_drop_rate = cond_drop_rate
        self.grad_ckpt = False  # activation checkpointing of every block while training
        # teacher forcing: the attention is told the mask is block-causal over scales (an attention.BlockCausal), not
        # only given the dense L×L mask, so that a kernel may skip what the mask hides ('flex'; the plain path uses the mask)
        self.grouped_attention = True

        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn ** 2))
            cur += pn ** 2

        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self._rng: Optional[torch.Generator] = None  # created on the model's device at first use

        # 1. input (word) embedding
        quant = vae_local.quantize
        self.vae_proxy = (vae_local,)        # a tuple, so the tokenizer is not part of this state dict
        self.vae_quant_proxy = (quant,)
        self.word_embed = nn.Linear(self.Cvae, self.C)

        # 2. class embedding; the last row is "no class" (condition dropout, unconditional guidance)
        init_std = math.sqrt(1 / self.C / 3)
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(self.num_classes + 1, self.C)
        nn.init.trunc_normal_(self.class_emb.weight.data, mean=0, std=init_std)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std)

        # 3. absolute position embedding, one row per token of every scale, and the level embedding
        pos_1LC = torch.empty(1, self.L, self.C)
        nn.init.trunc_normal_(pos_1LC, mean=0, std=init_std)
        self.pos_1LC = nn.Parameter(pos_1LC)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), self.C)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std)

        # 4. backbone blocks
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(self.D, 6 * self.C)) if shared_aln else nn.Identity()
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.drop_path_rate = drop_path_rate
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]  # stochastic depth decay rule
        self.attn_backend = choose_backend(flash_if_available)
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(
                cond_dim=self.D, shared_aln=shared_aln,
                block_idx=block_idx, embed_dim=self.C, norm_layer=norm_layer, num_heads=num_heads, mlp_ratio=mlp_ratio,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[block_idx], last_drop_p=0 if block_idx == 0 else dpr[block_idx - 1],
                attn_l2_norm=attn_l2_norm, attn_backend=self.attn_backend, fused_if_available=fused_if_available,
            )
            for block_idx in range(depth)
        ])
        logger.info('VAR d%d: attention backend %s', depth, describe_backends(self.attn_backend))

        # 5. block-causal mask for teacher forcing: a token sees its own and all coarser scales
        d_1L1 = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)]).view(1, self.L, 1)
        dT_11L = d_1L1.transpose(1, 2)
        self.register_buffer('lvl_1L', dT_11L[:, 0].contiguous())
        attn_bias_for_masking = torch.where(d_1L1 >= dT_11L, 0., -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer('attn_bias_for_masking', attn_bias_for_masking.contiguous())

        # 6. classifier head
        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_layer=norm_layer)
        self.head = nn.Linear(self.C, self.V)

    # ------------------------------------------------------------------ utilities
    @property
    def rng(self) -> torch.Generator:
        """The model's own generator (on the model's device); every draw of a seeded sampling call comes from it."""
        device = self.pos_start.device
        if self._rng is None or self._rng.device != device:
            self._rng = torch.Generator(device=device)
        return self._rng

    def set_attn_backend(self, backend: str) -> None:
        """Use another attention kernel: one of models.attention.BACKENDS."""
        if backend not in BACKENDS:
            raise ValueError(f'attention backend {backend!r} is not one of {BACKENDS}')
        self.attn_backend = backend
        for b in self.blocks:
            b.attn.backend = backend
        logger.info('VAR d%d: attention backend %s', self.depth, describe_backends(backend))

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Final AdaLN and head, in float32: (B, L, C) → (B, L, V)."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    # ------------------------------------------------------------------ sampling
    def _check_sampling_args(self, B: int, label_B: LabelArg, top_k: int, top_p: float, device) -> Optional[torch.Tensor]:
        if not isinstance(B, int) or isinstance(B, bool) or B < 1:
            raise ValueError(f'B (batch size) must be an integer >= 1, got {B!r}')
        if not isinstance(top_k, int) or top_k < 0 or top_k > self.V:
            raise ValueError(f'top_k={top_k!r} is not allowed: use 0 (no top-k filtering) or an integer from 1 to the vocabulary size {self.V}')
        if not (0.0 <= float(top_p) <= 1.0):
            raise ValueError(f'top_p={top_p!r} is outside [0, 1]: use 0 (no nucleus filtering) or a fraction such as 0.96')
        if label_B is None:
            return None
        if isinstance(label_B, bool):
            raise ValueError(f'label_B={label_B!r} is not a class label')
        if isinstance(label_B, int):
            if label_B > self.num_classes:
                raise ValueError(f'label_B={label_B} is outside [0, {self.num_classes}]: classes are 0..{self.num_classes - 1}, '
                                 f'{self.num_classes} (or any negative int) means "no class"')
            return torch.full((B,), fill_value=self.num_classes if label_B < 0 else label_B, device=device)
        label_B = torch.as_tensor(label_B, device=device)
        if label_B.dtype.is_floating_point or label_B.dtype == torch.bool or label_B.ndim != 1 or label_B.shape[0] != B:
            raise ValueError(f'label_B must be None, an int or {B} integer labels, got a {label_B.dtype} tensor of shape {tuple(label_B.shape)}')
        lo, hi = int(label_B.min()), int(label_B.max())
        if lo < 0 or hi > self.num_classes:
            raise ValueError(f'labels must be in [0, {self.num_classes}] (classes 0..{self.num_classes - 1}, {self.num_classes} = "no class"), '
                             f'got values from {lo} to {hi}')
        return label_B.long()

    @torch.no_grad()
    def autoregressive_infer_cfg(
        self, B: int, label_B: LabelArg, g_seed: Union[None, int, Sequence[int]] = None, cfg=1.5, top_k=0, top_p=0.0,
        more_smooth=False, input_img_tokens: Optional[List[torch.Tensor]] = None, edit_mask: Optional[torch.Tensor] = None,
        on_scale: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
    ) -> torch.Tensor:
        """Sample B images, coarse to fine, with classifier-free guidance.

        label_B: None (labels drawn uniformly), an int for all B (negative: no class) or B labels.
        g_seed: seeds the model's own generator; every random draw of the call then comes from it. A sequence
            of B seeds gives every sample a generator of its own instead (results independent of the batch).
        cfg: guidance strength, ramped linearly over scales. top_k, top_p: filtering (0 = off).
        more_smooth: Gumbel-softmax smoothing (for viewing, not FID).
        input_img_tokens, edit_mask: zero-shot editing; `vae.img_to_idxBl(img)` and an (h, w) mask with
        1 = keep the input image's tokens (see helpers.make_edit_mask).
        on_scale: optional callback(si, raw logits of the doubled batch (2B, l, V), drawn idx (B, l)).
        Returns images (B, 3, H, W) in [0, 1].

        The loop is `models.sampling.sample_next_scale`; call it for another guidance schedule, token sampler
        or per-scale hook.
        """
        device = self.lvl_1L.device
        label_B = self._check_sampling_args(B, label_B, top_k, top_p, device)
        if (input_img_tokens is None) != (edit_mask is None):
            raise ValueError('zero-shot editing needs both input_img_tokens (vae.img_to_idxBl(img)) and edit_mask')
        hooks: List[sampling.ScaleHook] = []
        if on_scale is not None:
            def call_on_scale(draw: sampling.ScaleDraw) -> sampling.ScaleDraw:
                on_scale(draw.si, draw.logits_2BlV, draw.idx_Bl)
                return draw
            hooks.append(call_on_scale)
        if edit_mask is not None:
            hooks.append(sampling.KeepInputTokens.from_mask(input_img_tokens, edit_mask, self.patch_nums, B,
                                                            self.vae_quant_proxy[0].embedding))
        rng = sampling.generators(g_seed, B, self)
        if label_B is None:
            label_B = sampling.uniform_labels(self.num_classes, B, rng, device)
        return sampling.sample_next_scale(self, label_B, rng, guidance=sampling.LinearGuidance(cfg),
                                          sampler=sampling.default_sampler(top_k, top_p, more_smooth), hooks=hooks)

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, label_B: torch.LongTensor, x_BLCv_wo_first_l: torch.Tensor, prog_si: int = -1) -> torch.Tensor:
        """Block-causal teacher forcing.

        label_B (B,); x_BLCv_wo_first_l (B, L − first_l, Cvae) from `quantize.idxBl_to_var_input`.
        prog_si: progressive training's stage; -1 (default): all scales; >= 0: scales 0..prog_si only,
        and L counts their tokens (the inputs of scales 1..prog_si). Returns logits (B, L, V) in float32.
        """
        if not -1 <= prog_si < len(self.patch_nums):
            raise ValueError(f'prog_si={prog_si}: must be -1 (all scales) or a scale index in [0, {len(self.patch_nums) - 1}]')
        bg, ed = self.begin_ends[prog_si] if prog_si >= 0 else (0, self.L)
        B = x_BLCv_wo_first_l.shape[0]
        if x_BLCv_wo_first_l.ndim != 3 or x_BLCv_wo_first_l.shape[1] != ed - self.first_l or x_BLCv_wo_first_l.shape[2] != self.Cvae:
            raise ValueError(f'x_BLCv_wo_first_l has shape {tuple(x_BLCv_wo_first_l.shape)}, expected ({B}, {ed - self.first_l}, {self.Cvae})'
                             f' for prog_si={prog_si} (progressive training passes its stage as prog_si)')
        with torch.autocast(device_type=x_BLCv_wo_first_l.device.type, enabled=False):
            if self.cond_drop_rate > 0:
                label_B = torch.where(torch.rand(B, device=label_B.device) < self.cond_drop_rate, self.num_classes, label_B)
            sos = cond_BD = self.class_emb(label_B)
            sos = sos.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)

            if prog_si == 0:
                x_BLC = sos
            else:
                x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed])  # lvl: BLC;  pos: 1LC

        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)

        # under autocast the blocks run in its dtype
        temp = x_BLC.new_ones(8, 8)
        main_type = torch.matmul(temp, temp).dtype
        x_BLC = x_BLC.to(dtype=main_type)
        cond_BD_or_gss = cond_BD_or_gss.to(dtype=main_type)
        attn_bias = attn_bias.to(dtype=main_type)
        if (self.grouped_attention and self.attn_backend != 'math') or self.attn_backend == 'flex':
            n_scales = len(self.patch_nums) if prog_si < 0 else prog_si + 1
            # 'flex': its BlockMask made here, outside compiled blocks, once per shape (flex_attention.py)
            attn_bias = BlockCausal.over_scales([pn * pn for pn in self.patch_nums[:n_scales]], attn_bias,
                                                flex_mask=self.attn_backend == 'flex')

        for b in self.blocks:
            if self.grad_ckpt and self.training and torch.is_grad_enabled():
                x_BLC = checkpoint(b, x_BLC, cond_BD_or_gss, attn_bias, use_reentrant=False)
            else:
                x_BLC = b(x=x_BLC, cond_BD=cond_BD_or_gss, attn_bias=attn_bias)
        x_BLC = self.get_logits(x_BLC.float(), cond_BD)

        if prog_si == 0:  # keep word_embed in the graph so DDP sees every parameter used
            x_BLC[0, 0, 0] += self.word_embed.weight[0, 0] * 0 + self.word_embed.bias[0] * 0
        return x_BLC    # logits BLV, V is vocab_size

    # ------------------------------------------------------------------ initialisation
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=0.02, conv_std_or_gain=0.02):
        """Initialisation for training from scratch.

        Linear and Embedding weights: truncated normal of std init_std (√(1/(3C)) when init_std < 0),
        zero biases; norms: weight 1, bias 0; the head weight × init_head; `attn.proj` and `ffn.fc2`
        weights ÷ √(2·depth); in every AdaLN projection the gamma rows × init_adaln_gamma and the
        scale/shift rows × init_adaln.
        """
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5     # init_std < 0: automated
        logger.info('[init_weights] %s with init_std=%g', type(self).__name__, init_std)
        for m in self.modules():
            with_weight = hasattr(m, 'weight') and m.weight is not None
            with_bias = hasattr(m, 'bias') and m.bias is not None
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if with_bias:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.padding_idx is not None:
                    m.weight.data[m.padding_idx].zero_()
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
                                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
                if with_weight:
                    m.weight.data.fill_(1.)
                if with_bias:
                    m.bias.data.zero_()
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                if conv_std_or_gain > 0:
                    nn.init.trunc_normal_(m.weight.data, std=conv_std_or_gain)
                else:
                    nn.init.xavier_normal_(m.weight.data, gain=-conv_std_or_gain)
                if with_bias:
                    m.bias.data.zero_()

        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()

        depth = len(self.blocks)
        for sab in self.blocks:
            sab.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            sab.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            if hasattr(sab, 'ada_lin'):
                sab.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                sab.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                sab.ada_lin[-1].bias.data.zero_()
            elif hasattr(sab, 'ada_gss'):
                sab.ada_gss.data[:, :, 2:].mul_(init_adaln)
                sab.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, with a readable error naming missing, unexpected and wrongly shaped keys."""
        if strict:
            check_state_dict(self, state_dict, kind='var')
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f'depth={self.depth}, C={self.C}, patch_nums={self.patch_nums}, drop_path_rate={self.drop_path_rate:g}'
