"""Next-scale sampling: VAR's coarse-to-fine loop, with the guidance schedule, the token sampler and per-scale hooks
as small replaceable pieces.

`sample_next_scale(var, label_B, rng, guidance, sampler, hooks)` runs the transformer once per scale with a KV cache,
on a doubled batch (the B conditional rows first, the B unconditional ones last), and at every scale si:

1. guidance: `t = guidance(si=si, ratio=ratio)`, ratio = si / (SN - 1); the logits drawn from are
   (1 + t) * cond - t * uncond. `LinearGuidance(cfg)` (t = cfg * ratio) is the paper's ramp.
2. sampler: `sampler(logits_BlV, si=si, ratio=ratio, rng=rng) -> TokenDraw(idx_Bl, soft_BlV=None)`: the token ids
   and, optionally, weights over the vocabulary whose mix of codebook rows replaces the ids' rows as the input of
   the next scale. `TopKTopP(top_k, top_p)` is the default; `GumbelSmoothing(TopKTopP(...))` is `more_smooth`.
3. hooks: each `hook(draw: ScaleDraw) -> ScaleDraw`, in order, may look at the scale or rewrite the tokens and
   embeddings it passes on. Zero-shot editing is one: `KeepInputTokens` keeps the input image's tokens where the
   mask says keep.
4. the scale pass: `scale_logits(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD) -> logits_2BlV`, every block against
   the KV cache, then the head. A model's own `var.scale_logits`, where set, replaces it for that model
   (utils.sampling_graphs.use_cuda_graphs sets one that replays a CUDA graph per scale); the draws stay outside it.

`VAR.autoregressive_infer_cfg` builds the defaults from its arguments and calls this loop, so both give the same
images from the same seed. Another schedule or sampler is a few lines:

    from dataclasses import dataclass
    import torch
    from models.sampling import TokenDraw, TopKTopP, generators, sample_next_scale

    @dataclass(frozen=True)
    class ConstantGuidance:            # the same cfg at every scale instead of the linear ramp
        cfg: float
        def __call__(self, *, si, ratio):
            return self.cfg

    def greedy(logits_BlV, *, si, ratio, rng):   # argmax: no randomness at all
        return TokenDraw(logits_BlV.argmax(dim=-1))

    label_B = torch.tensor([1, 2, 3, 4])
    rng = generators(0, B=4, var=var)            # the generator g_seed=0 gives autoregressive_infer_cfg
    img_B3HW = sample_next_scale(var, label_B, rng, guidance=ConstantGuidance(2.0),
                                 sampler=TopKTopP(top_k=900, top_p=0.96))
    greedy_B3HW = sample_next_scale(var, label_B, guidance=ConstantGuidance(2.0), sampler=greedy)

Letters (capital = all scales, lower = one scale): B batch, L tokens of all scales, l tokens of one scale,
C width, D condition width, V vocabulary, Cv tokenizer latent channels, h/w side of one scale's token map,
SN number of scales, si scale index (0 = coarsest).
"""
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .helpers import RNG, gumbel_softmax_with_rng, sample_with_top_k_top_p_

__all__ = ['sample_next_scale', 'GuidanceSchedule', 'LinearGuidance', 'TokenSampler', 'TokenDraw', 'TopKTopP',
           'GumbelSmoothing', 'default_sampler', 'ScaleDraw', 'ScaleHook', 'KeepInputTokens', 'generators',
           'uniform_labels', 'kv_cache', 'first_scale_input', 'next_scale_input', 'ScalePass', 'scale_logits', 'scale_pass_of']


# ---------------------------------------------------------------------------------------------- guidance schedules
class GuidanceSchedule(Protocol):
    """The classifier-free guidance weight t of scale si (ratio = si / (SN - 1), from 0 to 1)."""

    def __call__(self, *, si: int, ratio: float) -> float: ...


@dataclass(frozen=True)
class LinearGuidance:
    """The paper's schedule: t = cfg * ratio, no guidance at the first scale, cfg at the last."""
    cfg: float = 1.5

    def __call__(self, *, si: int, ratio: float) -> float:
        return self.cfg * ratio


# ---------------------------------------------------------------------------------------------- token samplers
class TokenDraw(NamedTuple):
    """A sampler's result for one scale: token ids (B, l) and, optionally, weights over the vocabulary (B, l, V)
    whose mix of codebook rows is passed on instead of the ids' rows."""
    idx_Bl: torch.Tensor
    soft_BlV: Optional[torch.Tensor] = None


class TokenSampler(Protocol):
    """Draws one scale's tokens from its guided logits (B, l, V); every random draw must come from rng."""

    def __call__(self, logits_BlV: torch.Tensor, *, si: int, ratio: float, rng: RNG) -> TokenDraw: ...


@dataclass(frozen=True)
class TopKTopP:
    """Multinomial draw after top-k (0 = off) and nucleus top-p (0 = off) filtering; filters the logits in place."""
    top_k: int = 0
    top_p: float = 0.0

    def __call__(self, logits_BlV: torch.Tensor, *, si: int, ratio: float, rng: RNG) -> TokenDraw:
        idx_Bl1 = sample_with_top_k_top_p_(logits_BlV, top_k=self.top_k, top_p=self.top_p, rng=rng, num_samples=1)
        return TokenDraw(idx_Bl1[:, :, 0])


@dataclass(frozen=True)
class GumbelSmoothing:
    """`more_smooth`: the ids of `sampler`, then a Gumbel-softmax mix of the logits as `sampler` left them (the
    default filters them in place), sharpened by 1 + ratio at temperature max(0.27 (1 - 0.95 ratio), 0.005), as in
    MaskGIT. For viewing; not for FID."""
    sampler: TokenSampler = TopKTopP()

    def __call__(self, logits_BlV: torch.Tensor, *, si: int, ratio: float, rng: RNG) -> TokenDraw:
        idx_Bl = self.sampler(logits_BlV, si=si, ratio=ratio, rng=rng).idx_Bl
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
        soft_BlV = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=tau, hard=False, dim=-1, rng=rng)
        return TokenDraw(idx_Bl, soft_BlV)


def default_sampler(top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False) -> TokenSampler:
    """The sampler `autoregressive_infer_cfg` uses for these arguments."""
    sampler = TopKTopP(top_k=top_k, top_p=top_p)
    return GumbelSmoothing(sampler) if more_smooth else sampler


# ---------------------------------------------------------------------------------------------- per-scale hooks
@dataclass
class ScaleDraw:
    """One scale's sampling, as hooks see it. h_BlCv is what the next scales are built from."""
    si: int
    ratio: float
    logits_2BlV: Optional[torch.Tensor]   # raw logits: conditional rows [:B], unconditional rows [B:]; None without hooks
    logits_BlV: torch.Tensor    # guided logits, as the sampler left them
    idx_Bl: torch.Tensor        # token ids
    h_BlCv: torch.Tensor        # their codebook rows, or the sampler's soft mix of rows


ScaleHook = Callable[[ScaleDraw], ScaleDraw]


@dataclass
class KeepInputTokens:
    """Zero-shot editing as a hook: at every scale, the input image's tokens (ids and codebook rows) where the
    mask keeps them, the drawn ones elsewhere."""
    input_idx_Bl: List[torch.Tensor]    # per scale, (B or 1, l)
    keep_Bl1: List[torch.Tensor]        # per scale, (B or 1, l, 1) booleans
    embedding: nn.Embedding             # the tokenizer's codebook

    def __call__(self, draw: ScaleDraw) -> ScaleDraw:
        keep_Bl1, input_idx_Bl = self.keep_Bl1[draw.si], self.input_idx_Bl[draw.si]
        h_BlCv = torch.where(keep_Bl1, self.embedding(input_idx_Bl).to(draw.h_BlCv.dtype), draw.h_BlCv)
        idx_Bl = torch.where(keep_Bl1[:, :, 0], input_idx_Bl, draw.idx_Bl)
        return dataclasses.replace(draw, idx_Bl=idx_Bl, h_BlCv=h_BlCv)

    @classmethod
    def from_mask(cls, input_img_tokens: Sequence[torch.Tensor], edit_mask: torch.Tensor, patch_nums: Sequence[int],
                  B: int, embedding: nn.Embedding) -> 'KeepInputTokens':
        """input_img_tokens from `vae.img_to_idxBl(img)`; edit_mask (h, w) or (B, h, w), 1 = keep the input image.
        The mask is resized to each scale (bilinear, kept where > 0.5); scales of 3 tokens or fewer are kept whole."""
        if len(input_img_tokens) != len(patch_nums):
            raise ValueError(f'input_img_tokens has {len(input_img_tokens)} token maps, the model has {len(patch_nums)} scales')
        for si, (idx_Bl, pn) in enumerate(zip(input_img_tokens, patch_nums)):
            if idx_Bl.ndim != 2 or idx_Bl.shape[1] != pn * pn or idx_Bl.shape[0] not in (1, B):
                raise ValueError(f'input_img_tokens[{si}] has shape {tuple(idx_Bl.shape)}, expected ({B} or 1, {pn * pn}); '
                                 f'make it with vae.img_to_idxBl(img)')
        device = embedding.weight.device
        edit_mask = torch.as_tensor(edit_mask, device=device, dtype=torch.float32)
        if edit_mask.ndim == 2:
            mask_N1hw = edit_mask[None, None]
        elif edit_mask.ndim == 3 and edit_mask.shape[0] in (1, B):
            mask_N1hw = edit_mask[:, None]
        else:
            raise ValueError(f'edit_mask must be (h, w) or ({B}, h, w) with 1 = keep the input image, got shape {tuple(edit_mask.shape)}')
        keep_Bl1 = []
        for pn in patch_nums:
            if pn * pn <= 3:
                keep_Bl1.append(torch.ones(1, pn * pn, 1, dtype=torch.bool, device=device))
            else:
                m_N1hw = F.interpolate(mask_N1hw, size=(pn, pn), mode='bilinear')
                keep_Bl1.append((m_N1hw > 0.5).view(m_N1hw.shape[0], pn * pn, 1))
        return cls(list(input_img_tokens), keep_Bl1, embedding)


# ---------------------------------------------------------------------------------------------- seeds and labels
def generators(g_seed: Union[None, int, Sequence[int]], B: int, var: nn.Module) -> RNG:
    """The random source of a sampling call: None (torch's global generator), the model's own generator seeded with
    an int, or one generator per sample for a sequence of B seeds (a sample's draws then do not depend on the batch)."""
    if g_seed is None:
        return None
    if isinstance(g_seed, int):
        return var.rng.manual_seed(g_seed)
    seeds = [int(s) for s in g_seed]
    if len(seeds) != B:
        raise ValueError(f'g_seed has {len(seeds)} per-sample seeds for B={B} samples')
    return [torch.Generator(device=var.pos_start.device).manual_seed(s) for s in seeds]


def uniform_labels(num_classes: int, B: int, rng: RNG, device) -> torch.Tensor:
    """B class labels drawn uniformly (the first draws of a call whose label_B is None)."""
    uniform_prob = torch.full((1, num_classes), fill_value=1.0 / num_classes, dtype=torch.float32, device=device)
    if isinstance(rng, list):
        return torch.cat([torch.multinomial(uniform_prob, num_samples=1, generator=g).reshape(1) for g in rng])
    return torch.multinomial(uniform_prob, num_samples=B, replacement=True, generator=rng).reshape(B)


# ---------------------------------------------------------------------------------------------- the loop
@contextmanager
def kv_cache(var: nn.Module) -> Iterator[None]:
    """Every block caches its keys and values while inside, in a cache of all var.L tokens allocated once; the caches
    are freed on the way out."""
    for b in var.blocks:
        b.attn.kv_caching(True, capacity=var.L)
    try:
        yield
    finally:
        for b in var.blocks:
            b.attn.kv_caching(False)


def first_scale_input(var: nn.Module, label_B: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cond_2BD: class embeddings of the labels then of "no class", x_2BlC: the first scale's input,
    lvl_pos_1LC: level + position embeddings of every token)."""
    B = label_B.shape[0]
    cond_2BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, fill_value=var.num_classes)), dim=0))
    lvl_pos_1LC = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x_2BlC = (cond_2BD.unsqueeze(1).expand(2 * B, var.first_l, -1) + var.pos_start.expand(2 * B, var.first_l, -1)
              + lvl_pos_1LC[:, :var.first_l])
    return cond_2BD, x_2BlC, lvl_pos_1LC


def next_scale_input(var: nn.Module, si: int, f_hat_BCvhw: torch.Tensor, h_BlCv: torch.Tensor,
                     lvl_pos_1LC: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Add scale si's tokens h_BlCv to the running latent f_hat; returns it and the next scale's input x_2BlC
    (None after the last scale)."""
    B, pn, patch_nums = h_BlCv.shape[0], var.patch_nums[si], var.patch_nums
    h_BCvhw = h_BlCv.transpose(1, 2).reshape(B, var.Cvae, pn, pn)
    f_hat_BCvhw, next_BCvhw = var.vae_quant_proxy[0].get_next_autoregressive_input(si, len(patch_nums), f_hat_BCvhw, h_BCvhw)
    if si == len(patch_nums) - 1:
        return f_hat_BCvhw, None
    bg, ed = var.begin_ends[si + 1]
    x_BlC = var.word_embed(next_BCvhw.view(B, var.Cvae, -1).transpose(1, 2)) + lvl_pos_1LC[:, bg:ed]
    return f_hat_BCvhw, x_BlC.repeat(2, 1, 1)   # the doubled batch of guidance


class ScalePass(Protocol):
    """Scale si's transformer pass: (model, si, x_2BlC (2B, l, C), cond_2BD_or_gss, cond_2BD (2B, D)) → float32 logits
    (2B, l, V), the scale's keys and values appended to every block's KV cache."""

    def __call__(self, var: nn.Module, si: int, x_2BlC: torch.Tensor, cond_2BD_or_gss: torch.Tensor,
                 cond_2BD: torch.Tensor) -> torch.Tensor: ...


def scale_logits(var: nn.Module, si: int, x_2BlC: torch.Tensor, cond_2BD_or_gss: torch.Tensor, cond_2BD: torch.Tensor) -> torch.Tensor:
    """The plain scale pass: every block over the scale's tokens against the KV cache, then the head."""
    for b in var.blocks:
        x_2BlC = b(x=x_2BlC, cond_BD=cond_2BD_or_gss, attn_bias=None)
    return var.get_logits(x_2BlC, cond_2BD)


def scale_pass_of(var: nn.Module) -> ScalePass:
    """The model's scale pass: `var.scale_logits` where a converter set one for this model (utils.sampling_graphs
    replays CUDA graphs of it), else the plain `scale_logits`. The loop keeps every random draw outside it."""
    return getattr(var, 'scale_logits', None) or scale_logits


def _checked_draw(token_draw: TokenDraw, logits_shape: torch.Size, sampler: TokenSampler) -> TokenDraw:
    """The sampler's result, if it has the shapes the loop needs; a clear error naming the sampler otherwise."""
    B, l, V = logits_shape
    if not isinstance(token_draw, TokenDraw):
        raise TypeError(f'the token sampler {sampler!r} returned {type(token_draw).__name__}, not a TokenDraw(idx_Bl, soft_BlV=None)')
    idx_Bl, soft_BlV = token_draw
    if idx_Bl.shape != (B, l) or idx_Bl.dtype.is_floating_point:
        raise ValueError(f'the token sampler {sampler!r} drew ids of shape {tuple(idx_Bl.shape)} and dtype {idx_Bl.dtype}; '
                         f'expected integer ids of shape ({B}, {l})')
    if soft_BlV is not None and soft_BlV.shape != (B, l, V):
        raise ValueError(f'the token sampler {sampler!r} gave soft weights of shape {tuple(soft_BlV.shape)}; expected ({B}, {l}, {V})')
    return token_draw


@torch.no_grad()
def sample_next_scale(var: nn.Module, label_B: torch.Tensor, rng: RNG = None,
                      guidance: GuidanceSchedule = LinearGuidance(), sampler: TokenSampler = TopKTopP(),
                      hooks: Sequence[ScaleHook] = ()) -> torch.Tensor:
    """Sample images for the class labels label_B (B,) (var.num_classes = no class) coarse to fine, every random draw
    from rng (see `generators`). Returns images (B, 3, H, W) in [0, 1]."""
    if (not isinstance(label_B, torch.Tensor) or label_B.ndim != 1 or label_B.dtype.is_floating_point or label_B.dtype == torch.bool
            or len(label_B) == 0 or int(label_B.min()) < 0 or int(label_B.max()) > var.num_classes):
        raise ValueError(f'label_B must be a 1-D integer tensor of labels in [0, {var.num_classes}] ({var.num_classes} = no class), '
                         f'got {label_B!r}')
    B, SN = label_B.shape[0], len(var.patch_nums)
    embedding = var.vae_quant_proxy[0].embedding
    cond_2BD, x_2BlC, lvl_pos_1LC = first_scale_input(var, label_B)
    cond_2BD_or_gss = var.shared_ada_lin(cond_2BD)
    f_hat_BCvhw = cond_2BD.new_zeros(B, var.Cvae, var.patch_nums[-1], var.patch_nums[-1])
    scale_pass = scale_pass_of(var)
    with kv_cache(var):
        for si in range(SN):
            ratio = si / max(SN - 1, 1)
            logits_2BlV = scale_pass(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD)
            t = guidance(si=si, ratio=ratio)
            logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
            if not hooks:   # nobody reads the raw logits: freed before the sampler's V-wide temporaries, as in the reference
                logits_2BlV = None
            token_draw = _checked_draw(sampler(logits_BlV, si=si, ratio=ratio, rng=rng), logits_BlV.shape, sampler)
            if token_draw.soft_BlV is None:
                h_BlCv = embedding(token_draw.idx_Bl)
            else:
                h_BlCv = token_draw.soft_BlV @ embedding.weight.unsqueeze(0)
            draw = ScaleDraw(si, ratio, logits_2BlV, logits_BlV, token_draw.idx_Bl, h_BlCv)
            for hook in hooks:
                draw = hook(draw)
                if not isinstance(draw, ScaleDraw):
                    raise TypeError(f'the scale hook {hook!r} returned {type(draw).__name__}, not a ScaleDraw: '
                                    f'return the draw it was given (or dataclasses.replace(draw, ...))')
            f_hat_BCvhw, x_2BlC = next_scale_input(var, si, f_hat_BCvhw, draw.h_BlCv, lvl_pos_1LC)
    return var.vae_proxy[0].fhat_to_img(f_hat_BCvhw).add_(1).mul_(0.5)   # from [-1, 1] to [0, 1]
