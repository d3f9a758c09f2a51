"""Mixed precision, gradient accumulation, clipping and non-finite-step skipping around one optimizer."""
import contextlib
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch

from utils.parallel import clip_grad_norm, is_dtensor

__all__ = ['AmpOptimizer', 'build_adamw', 'MAX_LOSS_SCALE']

logger = logging.getLogger(__name__)

# float16 overflows above 65504. As in the reference, a step whose scale was above this sets the next
# scale to it; a scale that grows from 2^15 is therefore used for one step at 2^16 before the cap applies.
MAX_LOSS_SCALE = 2.0 ** 15


def build_adamw(param_groups: List[Dict], lr: float, fused: bool, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with the reference's betas; fused kernels when asked for and supported on the parameters' device."""
    if fused:
        try:
            return torch.optim.AdamW(param_groups, lr=lr, weight_decay=0, betas=betas, fused=True)
        except (RuntimeError, TypeError, ValueError) as e:
            logger.info('fused AdamW unavailable here (%s); using the foreach implementation', e)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=0, betas=betas)


def _grad_scaler(device_type: str, sharded: bool):
    if sharded:   # FSDP2: the non-finite check of each process's gradient shards is reduced over the processes
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        return ShardedGradScaler(device=device_type, init_scale=2. ** 11, growth_interval=1000)
    try:
        return torch.amp.GradScaler(device_type, init_scale=2. ** 11, growth_interval=1000)
    except (AttributeError, TypeError):  # torch < 2.3 has a CUDA-only scaler
        if device_type != 'cuda':
            raise RuntimeError('--fp16=1 on the CPU needs torch >= 2.3 (torch.amp.GradScaler); use --fp16=2 (bfloat16)') from None
        return torch.cuda.amp.GradScaler(init_scale=2. ** 11, growth_interval=1000)


class AmpOptimizer:
    """mixed_precision 0: float32; 1: float16 autocast with a loss scaler; 2: bfloat16 autocast.

    The loss scaler is the reference's: initial scale 2^11, doubled after 1000 finite steps, halved
    (and the step skipped) on a non-finite gradient, and reset to 2^15 after any step that used a
    larger scale (MAX_LOSS_SCALE).
    """

    def __init__(self, device_type: str, mixed_precision: int, optimizer: torch.optim.Optimizer, names: List[str],
                 paras: List[torch.nn.Parameter], grad_clip: float, n_gradient_accumulation: int = 1):
        self.sharded = any(is_dtensor(p) for p in paras)   # FSDP2 shards (--fsdp=1)
        self.enable_amp = mixed_precision > 0
        self.using_fp16_rather_bf16 = mixed_precision == 1
        self.device_type = device_type
        if self.enable_amp:
            self.amp_dtype = torch.float16 if self.using_fp16_rather_bf16 else torch.bfloat16
            self.scaler = _grad_scaler(device_type, self.sharded) if self.using_fp16_rather_bf16 else None
        else:
            self.amp_dtype = None
            self.scaler = None
        self.optimizer, self.names, self.paras = optimizer, names, paras
        self.grad_clip = grad_clip
        self.r_accu = 1 / n_gradient_accumulation

    @property
    def amp_ctx(self):
        if not self.enable_amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=True, cache_enabled=True)

    def backward_clip_step(self, stepping: bool, loss: torch.Tensor) -> Tuple[Optional[float], Optional[float], bool]:
        """Backward (scaled, divided by the accumulation count); on a stepping iteration unscale, clip and step.

        Returns (gradient norm before clipping, log2 of the loss scale this step's gradients were
        computed with (before the scaler's update), whether the step was skipped
        because the gradient was not finite). Norm and scale are None on accumulating iterations.
        """
        loss = loss.mul(self.r_accu)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if not stepping:
            return None, None, False

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float('inf')
        grad_norm = clip_grad_norm(self.paras, max_norm)   # over every shard under --fsdp=1
        skipped = not math.isfinite(grad_norm)
        scale_log2 = None
        if self.scaler is not None:
            if self.sharded:   # fused AdamW's own check of the scaler's flag does not take DTensor shards; the norm is global
                if not skipped:
                    self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)  # skips the update by itself when a gradient is not finite
            used_scale = self.scaler.get_scale()
            if used_scale > MAX_LOSS_SCALE:
                self.scaler.update(new_scale=MAX_LOSS_SCALE)
            else:
                self.scaler.update()
            scale_log2 = math.log2(used_scale)
        elif not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, scale_log2, skipped

    def state_dict(self) -> Dict:
        sd = {'optimizer': self.optimizer.state_dict()}
        if self.scaler is not None:
            sd['scaler'] = self.scaler.state_dict()
        return sd

    def load_state_dict(self, state: Dict) -> None:
        """Optimizer and loss-scaler state; a checkpoint of another --fp16 mode is converted, and the log says how."""
        self.optimizer.load_state_dict(state['optimizer'])
        has_scaler = 'scaler' in state
        if self.scaler is not None and has_scaler:
            self.scaler.load_state_dict(state['scaler'])
        elif self.scaler is not None:
            logger.warning('the checkpoint was trained without a loss scaler (--fp16=0 or 2): the optimizer state is kept and the '
                           'float16 loss scaler starts afresh at 2^11')
        elif has_scaler:
            logger.warning('the checkpoint was trained with --fp16=1: the optimizer state is kept and its loss-scaler state '
                           '(scale %g) is dropped, since this run uses --fp16=%d', state['scaler'].get('scale', float('nan')),
                           2 if self.enable_amp else 0)
