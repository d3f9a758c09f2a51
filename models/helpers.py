"""Sampling helpers of VAR: top-k / top-p filtering, Gumbel smoothing, drop path, zero-shot edit masks.

Letters: B batch, l tokens of one scale, V vocabulary, h/w side of a mask.
"""
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['sample_with_top_k_top_p_', 'gumbel_softmax_with_rng', 'DropPath', 'make_edit_mask', 'EDIT_MODES']


RNG = Union[None, torch.Generator, Sequence[torch.Generator]]


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             rng: RNG = None, num_samples: int = 1) -> torch.Tensor:
    """Filter logits in place (top_k > 0: keep the k largest; top_p > 0: nucleus) and draw (B, l, num_samples) indices.

    rng: one generator for the whole batch (the reference's behaviour), or B generators, one per sample,
    so that a sample's draws do not depend on the rest of the batch.
    """
    B, l, V = logits_BlV.shape
    if not (top_k > 0 and top_p > 0 and _top_k_top_p_filter_fast_(logits_BlV, top_k, top_p)):
        top_k_top_p_filter_reference_(logits_BlV, top_k, top_p)
    replacement = num_samples >= 0
    num_samples = abs(num_samples)
    probs_BlV = logits_BlV.softmax(dim=-1)
    if isinstance(rng, (list, tuple)):
        return torch.stack([torch.multinomial(probs_BlV[b], num_samples=num_samples, replacement=replacement, generator=g)
                            for b, g in enumerate(rng)])
    return torch.multinomial(probs_BlV.view(-1, V), num_samples=num_samples, replacement=replacement, generator=rng).view(B, l, num_samples)


def top_k_top_p_filter_reference_(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> None:
    """The reference's filtering in place: top_k > 0 keeps the logits >= the k-th largest; top_p > 0 sorts all V and
    removes the smallest ones whose softmax mass sums to <= 1 - top_p (never the largest)."""
    if top_k > 0:
        idx_to_remove = logits_BlV < logits_BlV.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(idx_to_remove, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        sorted_idx_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_idx_to_remove[..., -1:] = False  # never the largest
        logits_BlV.masked_fill_(sorted_idx_to_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_idx_to_remove), -torch.inf)


def _top_k_top_p_filter_fast_(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> bool:
    """The reference's top-k + top-p filtering without sorting all V: bit-identical, or False (logits untouched).

    Without a tie at the k-th value, the top-k-masked row sorted ascending is (V - k) -inf followed by the k largest
    ascending, built here from topk(sorted=True); the same V-wide softmax and cumsum then give the same flags. Falls
    back (returns False) where the result could depend on the order torch's unstable sort gives tied values: a tie
    at the k-th value, or a tie run inside the top k whose flags differ. Float32 CPU only.
    """
    V = logits_BlV.shape[-1]
    if not (logits_BlV.dtype == torch.float32 and logits_BlV.device.type == 'cpu' and top_k <= V):
        return False
    vals_BlK, idx_BlK = logits_BlV.topk(min(top_k + 1, V), largest=True, sorted=True, dim=-1)   # descending
    if bool(vals_BlK[..., 0].isnan().any()):
        return False  # topk ranks NaN first; leave NaN rows to the reference
    if top_k < V:
        if not bool((vals_BlK[..., top_k] < vals_BlK[..., top_k - 1]).all()):
            return False  # a tie at the k-th value (or -inf there): the mask keeps more than k
        vals_BlK, idx_BlK = vals_BlK[..., :top_k], idx_BlK[..., :top_k]
    sorted_logits_BlV = logits_BlV.new_full(logits_BlV.shape, -torch.inf)
    sorted_logits_BlV[..., V - top_k:] = vals_BlK.flip(-1)
    remove_BlK = (sorted_logits_BlV.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p))[..., V - top_k:].flip(-1)
    remove_BlK[..., 0] = False  # never the largest
    if top_k > 1 and bool(((vals_BlK[..., 1:] == vals_BlK[..., :-1]) & (remove_BlK[..., 1:] != remove_BlK[..., :-1])).any()):
        return False  # the cut falls inside a run of equal values: which of them the reference removes is the sort's choice
    remove_BlV = torch.ones_like(logits_BlV, dtype=torch.bool).scatter_(-1, idx_BlK, remove_BlK)
    logits_BlV.masked_fill_(remove_BlV, -torch.inf)
    return True


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1, hard: bool = False, eps: float = 1e-10,
                            dim: int = -1, rng: RNG = None) -> torch.Tensor:
    """F.gumbel_softmax whose Gumbel noise −log(Exponential(1)) comes from `rng` (one generator, or one per sample along dim 0)."""
    if rng is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=hard, eps=eps, dim=dim)
    if isinstance(rng, (list, tuple)):
        gumbels = torch.stack([-torch.empty_like(logits[b], memory_format=torch.legacy_contiguous_format).exponential_(generator=g).log()
                               for b, g in enumerate(rng)])
    else:
        gumbels = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits, memory_format=torch.legacy_contiguous_format).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability drop_prob while training.

    Under torch.compile the keep probability is read from a tensor (`keep_prob`, not in the state dict) instead of
    the float: a float attribute is compiled in as a constant, so blocks of different rates (the stochastic depth
    decay rule gives every block its own) would each need a graph of their own (utils/compile.py).
    """

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.register_buffer('keep_prob', torch.tensor(1.0 - drop_prob), persistent=False)
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    @property
    def drop_prob(self) -> float:
        return self._drop_prob

    @drop_prob.setter
    def drop_prob(self, p: float) -> None:
        self._drop_prob = p
        with torch.no_grad():
            self.keep_prob.fill_(1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._compiled_forward(x)
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor

    def _compiled_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same distribution, the keep probability read from its tensor (no constant of this block's rate in the graph)."""
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = (torch.rand(shape, device=x.device) < self.keep_prob).float()
        if self.scale_by_keep:   # keep_prob is 0 only for drop_prob 1, where the eager path does not divide either
            random_tensor = random_tensor / self.keep_prob.clamp_min(torch.finfo(torch.float32).tiny)
        return x * random_tensor.to(x.dtype)

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'


EDIT_MODES = ('inpaint', 'outpaint', 'class')


def make_edit_mask(box: Sequence[float], mode: str, size: Tuple[int, int], device=None) -> torch.Tensor:
    """An `edit_mask` (h, w) for zero-shot editing, 1 = keep the input image's tokens, 0 = generate.

    box: (y0, x0, y1, x1) in [0, 1], fractions of the image height and width.
    mode: 'inpaint' regenerates the box and keeps the rest; 'outpaint' keeps the box and regenerates
    the rest; 'class' regenerates the box like 'inpaint' (sample it with the target class label).
    size: (h, w) of the mask, normally the last scale's side (patch_nums[-1], patch_nums[-1]).
    """
    if mode not in EDIT_MODES:
        raise ValueError(f'edit mode {mode!r} is not one of {EDIT_MODES}')
    if len(box) != 4:
        raise ValueError(f'box must be (y0, x0, y1, x1), got {tuple(box)}')
    y0, x0, y1, x1 = (float(v) for v in box)
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise ValueError(f'box (y0, x0, y1, x1) = {tuple(box)} must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1')
    h, w = size
    inside_hw = torch.zeros(h, w, device=device)
    r0, r1, c0, c1 = round(y0 * h), round(y1 * h), round(x0 * w), round(x1 * w)
    if r0 >= r1 or c0 >= c1:
        raise ValueError(f'box {tuple(box)} covers no cell of the {h}x{w} token map; make it larger')
    inside_hw[r0:r1, c0:c1] = 1.0
    return inside_hw if mode == 'outpaint' else 1.0 - inside_hw
