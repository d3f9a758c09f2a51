"""Pictures of training progress for tensorboard: VAR samples of fixed classes and seeds, tokenizer reconstructions.

Letters: B images, SN scales, H/W image side.
"""
import contextlib
import math
from typing import Iterator, List, Sequence

import numpy as np
import torch
import torch.nn as nn

from utils.imgs import make_grid
from utils.parallel import is_dtensor, reshard

__all__ = ['vis_epochs_due', 'fixed_classes', 'ema_weights', 'sample_grid', 'reconstruction_grids', 'VIS_SAMPLES']

VIS_SAMPLES = 8     # images per sample grid: VIS_SAMPLES classes, one seed each


def vis_epochs_due(ep_done: int, total_ep: int, every: int) -> bool:
    """Whether a grid is drawn after epoch `ep_done` (1-based): every `every` epochs (0: a tenth of the run) and after the last."""
    if every < 0:
        return False
    every = every or max(1, math.ceil(total_ep / 10))
    return ep_done % every == 0 or ep_done == total_ep


def fixed_classes(num_classes: int, n: int = VIS_SAMPLES) -> List[int]:
    """n class labels spread evenly over [0, num_classes): the same every time, so that grids compare across epochs."""
    return [i * num_classes // n for i in range(n)]


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema) -> Iterator[nn.Module]:
    """Inside the block, `model`'s parameters are the EMA's (trainer.EMA; None: unchanged); no copy, swapped back after."""
    if ema is None:
        yield model
        return
    names = [n for n, _ in model.named_parameters()]
    if names != ema.names:
        raise RuntimeError('the EMA does not hold the parameters of this model')

    def swap():
        reshard(model)   # FSDP2: after a forward without gradients the root's parameters() are the gathered tensors, not the shards
        for p, e in zip(model.parameters(), ema.params):
            if is_dtensor(p):   # FSDP2 gathers from the shard's own storage: exchange the values in place
                p_local, e_local = p.detach().to_local(), e.to_local()
                tmp = p_local.clone()
                p_local.copy_(e_local)
                e_local.copy_(tmp)
            else:
                p.data, e.data = e.data, p.data

    with torch.no_grad():
        swap()
    try:
        yield model
    finally:
        with torch.no_grad():
            swap()


@torch.no_grad()
def sample_grid(var: nn.Module, classes: Sequence[int], seed: int, amp_ctx=None, cfg: float = 1.5, top_k: int = 900,
                top_p: float = 0.96) -> np.ndarray:
    """One sample per class (sample i seeded by seed + i), in eval mode, tiled in a row: (H', W', 3) uint8.

    cfg, top_k, top_p: sample.py's defaults (top_k capped at the vocabulary size).
    """
    training = var.training
    var.eval()
    try:
        with amp_ctx if amp_ctx is not None else contextlib.nullcontext():
            img_B3HW = var.autoregressive_infer_cfg(B=len(classes), label_B=torch.tensor(classes, device=var.lvl_1L.device),
                                                    g_seed=[seed + i for i in range(len(classes))], cfg=cfg, top_k=min(top_k, var.V),
                                                    top_p=top_p)
    finally:
        var.train(training)
        reshard(var)   # --fsdp=1: the shards are the parameters again
    return make_grid(img_B3HW.float(), nrow=len(classes))


@torch.no_grad()
def reconstruction_grids(vae: nn.Module, inp_B3HW: torch.Tensor, amp_ctx=None) -> dict:
    """{'final': inputs beside their reconstructions, 'per_scale': inputs beside the reconstructions from scales 1, 1-2, ..., all}.

    One row per image; inputs in [-1, 1]; each grid (H', W', 3) uint8.
    """
    training = vae.training
    vae.eval()
    try:
        with amp_ctx if amp_ctx is not None else contextlib.nullcontext():
            rec_list_B3HW = vae.img_to_reconstructed_img(inp_B3HW, last_one=False)   # SN prefixes of scales, the last is all
    finally:
        vae.train(training)
        reshard(vae)
    to01 = lambda x: (x.float() + 1) / 2   # noqa: E731

    def rows(columns: List[torch.Tensor]) -> np.ndarray:
        tiles_B3HW = torch.stack([to01(c) for c in columns], dim=1).flatten(0, 1)   # image-major: one row per image
        return make_grid(tiles_B3HW, nrow=len(columns))

    return {'final': rows([inp_B3HW, rec_list_B3HW[-1]]), 'per_scale': rows([inp_B3HW, *rec_list_B3HW])}
