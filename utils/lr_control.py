"""Learning-rate and weight-decay schedules of the reference recipe, and its no-weight-decay groups."""
import logging
import math
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ['check_schedule', 'lr_factor', 'wd_at', 'lr_wd_annealing', 'filter_params', 'match_saved_groups', 'SCHEDULES', 'NOWD_KEYS']

logger = logging.getLogger(__name__)

SCHEDULES = ('lin0', 'lin', 'lin00', 'linX', 'cos', 'exp')

# parameter names that never get weight decay (besides every bias and every 1-D parameter)
NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start', 'start_pos',
             'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul')


def check_schedule(sche_type: str) -> None:
    """ValueError unless sche_type is lin0, lin, lin00, cos, exp or linX with X a fraction in (0, 1)."""
    if sche_type in SCHEDULES and sche_type != 'linX':
        return
    if sche_type.startswith('lin'):
        try:
            T = float(sche_type[3:])
        except ValueError:
            T = None
        if T is not None and 0 < T < 1:
            return
    raise ValueError(f'unknown lr schedule {sche_type!r}: use one of lin0, lin, lin00, linX (X a fraction in (0, 1), e.g. lin0.3), cos, exp')


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
    """Names, parameters and the AdamW groups ('D' decayed, 'ND' not) of the trainable parameters.

    Groups are created in order of first appearance over named_parameters(), as the reference does
    (for VAR: 'ND' first, since pos_start comes first). The optimizer's state indices follow this
    order, so it is what makes checkpoints cross over with the reference's trainer.
    """
    groups: Dict[str, Dict] = {}
    names, paras = [], []
    for name, para in model.named_parameters():
        if not para.requires_grad:
            continue
        names.append(name)
        paras.append(para)
        nd = para.ndim == 1 or name.endswith('bias') or any(k in name for k in nowd_keys)
        key = 'ND' if nd else 'D'
        g = groups.setdefault(key, {'params': [], 'names': [], 'wd_sc': 0.0 if nd else 1.0, 'lr_sc': 1.0})
        g['params'].append(para)
        g['names'].append(name)
    for k, g in groups.items():
        logger.info('optimizer group %s (wd x%g): %d tensors, %d parameters', k, g['wd_sc'], len(g['params']), sum(p.numel() for p in g['params']))
    return names, paras, [{k: v for k, v in g.items() if k != 'names'} for g in groups.values()]


def match_saved_groups(saved: Dict, optimizer: torch.optim.Optimizer) -> Dict:
    """A saved optimizer state dict with its groups in the order of `optimizer`'s groups.

    Checkpoints written before the groups followed the reference's order hold [decay, no-decay];
    their groups (told apart by wd_sc and size) and state indices are renumbered, and the log says so.
    Anything else is returned as it is (the optimizer's own load then checks it).
    """
    cur = [(g.get('wd_sc'), len(g['params'])) for g in optimizer.param_groups]
    old = [(g.get('wd_sc'), len(g['params'])) for g in saved['param_groups']]
    if old == cur or sorted(old, key=repr) != sorted(cur, key=repr) or len(set(cur)) != len(cur):
        return saved
    groups, index_of = [], {}
    for wd_sc_and_len in cur:
        g = saved['param_groups'][old.index(wd_sc_and_len)]
        ids = []
        for i in g['params']:
            index_of[i] = len(index_of)
            ids.append(index_of[i])
        groups.append({**g, 'params': ids})
    logger.warning('the checkpoint\'s optimizer groups are in another order (wd_sc %s, now %s): its moments are renumbered '
                   'to stay on their parameters', [w for w, _ in old], [w for w, _ in cur])
    return {'state': {index_of[i]: v for i, v in saved['state'].items()}, 'param_groups': groups}
