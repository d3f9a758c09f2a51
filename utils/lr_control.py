"""Learning-rate and weight-decay schedules of the reference recipe, and its no-weight-decay groups."""
import logging
import math
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ['lr_factor', 'wd_at', 'lr_wd_annealing', 'filter_params', 'SCHEDULES', 'NOWD_KEYS']

logger = logging.getLogger(__name__)

SCHEDULES = ('lin0', 'lin', 'lin00', 'linX', 'cos', 'exp')

# parameter names that never get weight decay (besides every bias and every 1-D parameter)
NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start', 'start_pos',
             'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')


def lr_factor(sche_type: str, cur_it: int, wp_it: float, max_it: int, wp0: float = 0.005, wpe: float = 0.001) -> float:
    """Multiplier of the peak lr at iteration cur_it: linear warm-up from wp0, then the schedule down to wpe."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        return wp0 + (1 - wp0) * cur_it / wp_it
    pasd = (cur_it - wp_it) / max(max_it - 1 - wp_it, 1)   # [0, 1]
    rest = 1 - pasd     # [1, 0]
    if sche_type == 'cos':
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
    if sche_type == 'lin':
        T = 0.15
        return 1 if pasd < T else wpe + (1 - wpe) * rest / (1 - T)
    if sche_type == 'lin0':
        T = 0.05
        return 1 if pasd < T else wpe + (1 - wpe) * rest / (1 - T)
    if sche_type == 'lin00':
        return wpe + (1 - wpe) * rest
    if sche_type.startswith('lin'):
        try:
            T = float(sche_type[3:])
        except ValueError:
            raise ValueError(f'unknown lr schedule {sche_type!r}: use one of lin0, lin, lin00, linX (X a fraction), cos, exp') from None
        max_rest = 1 - T
        wpe_mid = wpe + (1 - wpe) * max_rest
        wpe_mid = (1 + wpe_mid) / 2
        return 1 + (wpe_mid - 1) * pasd / T if pasd < T else wpe + (wpe_mid - wpe) * rest / max_rest
    if sche_type == 'exp':
        T = 0.15
        return 1 if pasd < T else math.exp((pasd - T) / (1 - T) * math.log(wpe))
    raise ValueError(f'unknown lr schedule {sche_type!r}: use one of lin0, lin, lin00, linX (X a fraction), cos, exp')


def wd_at(cur_it: int, max_it: int, wd: float, wd_end: float) -> float:
    """Weight decay follows a half cosine from wd to wd_end."""
    pasd = cur_it / max(max_it - 1, 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * pasd))


def lr_wd_annealing(sche_type: str, optimizer: torch.optim.Optimizer, peak_lr: float, wd: float, wd_end: float,
                    cur_it: int, wp_it: float, max_it: int, wp0: float = 0.005, wpe: float = 0.001) -> Tuple[float, float, float, float]:
    """Set every group's lr and weight decay for iteration cur_it; returns (min lr, max lr, min wd, max wd)."""
    cur_lr = lr_factor(sche_type, cur_it, wp_it, max_it, wp0=wp0, wpe=wpe) * peak_lr
    cur_wd = wd_at(cur_it, max_it, wd, wd_end)
    lrs, wds = [], []
    for param_group in optimizer.param_groups:
        param_group['lr'] = cur_lr * param_group.get('lr_sc', 1)
        param_group['weight_decay'] = cur_wd * param_group.get('wd_sc', 1)
        lrs.append(param_group['lr'])
        if param_group['weight_decay'] > 0:
            wds.append(param_group['weight_decay'])
    return min(lrs, default=-1), max(lrs, default=-1), min(wds, default=-1), max(wds, default=-1)


def filter_params(model: torch.nn.Module, nowd_keys: Sequence[str] = NOWD_KEYS
                  ) -> Tuple[List[str], List[torch.nn.Parameter], List[Dict]]:
    """Names, parameters and the two AdamW groups ('D' decayed, 'ND' not) of the trainable parameters."""
    groups = {'D': {'params': [], 'names': [], 'wd_sc': 1.0, 'lr_sc': 1.0},
              'ND': {'params': [], 'names': [], 'wd_sc': 0.0, 'lr_sc': 1.0}}
    names, paras = [], []
    for name, para in model.named_parameters():
        if not para.requires_grad:
            continue
        names.append(name)
        paras.append(para)
        nd = para.ndim == 1 or name.endswith('bias') or any(k in name for k in nowd_keys)
        g = groups['ND' if nd else 'D']
        g['params'].append(para)
        g['names'].append(name)
    for k, g in groups.items():
        logger.info('optimizer group %s (wd x%g): %d tensors, %d parameters', k, g['wd_sc'], len(g['params']), sum(p.numel() for p in g['params']))
    out = []
    for g in groups.values():
        if g['params']:
            g = dict(g)
            g.pop('names')
            out.append(g)
    return names, paras, out
