"""Progressive training: which scales a training iteration trains, and how much the newest one weighs.

With --pg > 0 the first `pg` of training grows the trained prefix of scales from stage --pg0 (scales
0..pg0) to all of them, one stage at a time; a new stage's own tokens start at a small loss weight that
rises over --pgwp epochs. The loop asks `ProgressiveSchedule.advance(g_it)` for the stage and warm-up
weight of each iteration and `loss_weight_1L(...)` for the per-token weights. Its state is what the
reference's trainer writes into a checkpoint's trainer['config'] (prog_it, last_prog_si, first_prog).

A stage prog_si >= 0 trains scales 0..prog_si; -1 trains all scales (no progressive training, or its end).
Letters: L tokens of all scales.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ['ProgressiveSchedule']


@dataclass
class ProgressiveSchedule:
    patch_nums: Tuple[int, ...]
    pg: float = 0.0             # > 0: progressive during the first pg of the iterations; 0: off
    pg0: int = 4                # the first stage: scales 0..pg0
    wp_it: float = 0.0          # iterations of the lr warm-up, all at stage pg0
    max_it: int = 0             # iterations of the whole run
    prog_wp_it: float = 0.0     # iterations over which a new stage's tokens warm up to full weight; 0: none
    # state, saved in checkpoints under the reference's names
    prog_it: int = 0            # iterations done at the current stage (all iterations when pg is 0)
    last_prog_si: int = -1      # the stage of the last iteration (-1: none yet, or pg is 0)
    first_prog: bool = True     # still at the first stage: no warm-up, the lr warm-up covers it

    def __post_init__(self):
        self.patch_nums = tuple(self.patch_nums)
        n = len(self.patch_nums)
        if not 0 <= self.pg < 1:
            raise ValueError(f'pg={self.pg}: must be in [0, 1) (the fraction of training that is progressive; 0: off)')
        if self.pg > 0:
            if not 0 <= self.pg0 < n:
                raise ValueError(f'pg0={self.pg0}: must be in [0, {n - 1}] (a stage of the {n} scales {self.patch_nums})')
            if self.max_it < 1:
                raise ValueError(f'max_it={self.max_it}: progressive training (pg={self.pg}) needs the run\'s iteration count')
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.begin_ends: List[Tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

    @classmethod
    def from_args(cls, args, iters_train: int) -> 'ProgressiveSchedule':
        """From train.py's finalized flags (--pn --pg --pg0 --pgwp --wp --ep) and the iterations of one epoch."""
        return cls(patch_nums=args.patch_nums, pg=args.pg, pg0=args.pg0, wp_it=args.wp * iters_train,
                   max_it=args.ep * iters_train, prog_wp_it=args.pgwp * iters_train)

    # ------------------------------------------------------------------ the schedule
    def stage(self, g_it: int) -> int:
        """The last scale trained at global iteration g_it by the reference's rule: pg0 through the lr
        warm-up, then a linear climb to the last scale at pg of training; -1 when pg is 0."""
        if not self.pg:
            return -1
        if g_it <= self.wp_it:
            return self.pg0
        if g_it >= self.max_it * self.pg:
            return len(self.patch_nums) - 1
        progress = min(max((g_it - self.wp_it) / (self.max_it * self.pg - self.wp_it), 0), 1)
        return self.pg0 + round(progress * (len(self.patch_nums) - 1 - self.pg0))

    def advance(self, g_it: int) -> Tuple[int, float]:
        """Count one iteration at g_it's stage; returns (prog_si, prog_wp): the stage trained (-1: all
        scales, also at the last stage) and the warm-up weight in [0.01, 1] of that stage's own tokens."""
        si = self.stage(g_it)
        if si != self.last_prog_si:
            if self.last_prog_si != -1:
                self.first_prog = False
            self.last_prog_si, self.prog_it = si, 0
        self.prog_it += 1
        prog_wp = max(min(self.prog_it / self.prog_wp_it, 1), 0.01) if self.prog_wp_it > 0 else 1
        if self.first_prog:
            prog_wp = 1
        return (-1 if si == len(self.patch_nums) - 1 else si), prog_wp

    def n_tokens(self, prog_si: int) -> int:
        """Tokens of the scales trained at stage prog_si (L for -1)."""
        return self.begin_ends[prog_si][1] if prog_si >= 0 else self.L

    def loss_weight_1L(self, prog_si: int, prog_wp: float, device: Optional[torch.device] = None) -> torch.Tensor:
        """Per-token loss weights (1, n_tokens(prog_si)), broadcast over the batch: 1/L each, the tokens of
        scale prog_si times prog_wp (clamped to [0, 1])."""
        lw_1L = torch.ones(1, self.L, device=device) / self.L
        if prog_si < 0:
            return lw_1L
        bg, ed = self.begin_ends[prog_si]
        lw_1L = lw_1L[:, :ed]
        lw_1L[:, bg:ed] *= min(max(prog_wp, 0), 1)
        return lw_1L

    def truncate(self, idx_Bl: Sequence[torch.Tensor], prog_si: int) -> List[torch.Tensor]:
        """The token maps (B, pn²) of the scales trained at stage prog_si, from those of all scales."""
        return list(idx_Bl) if prog_si < 0 else list(idx_Bl[:prog_si + 1])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, object]:
        """The reference trainer's progressive keys of trainer['config']."""
        return {'prog_it': self.prog_it, 'last_prog_si': self.last_prog_si, 'first_prog': self.first_prog}

    def load_state_dict(self, config: Dict[str, object]) -> None:
        """Read those keys from a checkpoint's trainer['config'] (other keys are ignored; missing ones start afresh)."""
        self.prog_it = int(config.get('prog_it', 0))
        self.last_prog_si = int(config.get('last_prog_si', -1))
        self.first_prog = bool(config.get('first_prog', True))
