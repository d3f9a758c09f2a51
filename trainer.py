"""One VAR training step (tokenise, teacher-forced forward, weighted cross-entropy, AMP backward) and evaluation.

Letters: B batch, L tokens of all scales, l tokens of one scale, V vocabulary.
"""
import contextlib
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import dist
from models import VAR, VQVAE
from utils.amp_opt import AmpOptimizer
from utils.lr_control import match_saved_groups
from utils.progressive import ProgressiveSchedule

__all__ = ['VARTrainer', 'EMA']


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(self.params, [p.detach() for p in model.parameters()], 1 - self.decay)

    def state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters: loads into the same class strictly."""
        sd = dict(model.state_dict())
        for n, p in zip(self.names, self.params):
            sd[n] = p.clone()
        return sd

    def load_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        for n, p in zip(self.names, self.params):
            p.copy_(sd[n])


class VARTrainer:
    def __init__(self, device: torch.device, patch_nums: Sequence[int], resos: Sequence[int], vae_local: VQVAE,
                 var_wo_ddp: VAR, var: nn.Module, var_opt: AmpOptimizer, label_smooth: float, ema_decay: float = 0.0,
                 progressive: Optional[ProgressiveSchedule] = None):
        self.device = device
        self.var, self.vae_local, self.quantize_local = var, vae_local, vae_local.quantize
        self.var_wo_ddp = var_wo_ddp
        self.var_opt = var_opt
        self.ema = EMA(var_wo_ddp, ema_decay) if ema_decay > 0 else None

        self.label_smooth = label_smooth
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smooth, reduction='none')
        self.val_loss = nn.CrossEntropyLoss(label_smoothing=0.0, reduction='mean')
        self.L = sum(pn * pn for pn in patch_nums)
        self.last_l = patch_nums[-1] * patch_nums[-1]

        self.patch_nums, self.resos = tuple(patch_nums), tuple(resos)
        self.begin_ends = []
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        self.progressive = ProgressiveSchedule(self.patch_nums) if progressive is None else progressive   # default: off
        if self.progressive.patch_nums != self.patch_nums:
            raise ValueError(f'the progressive schedule is for the scales {self.progressive.patch_nums}, the trainer for {self.patch_nums}')

    @property
    def prog_it(self) -> int:
        """Iterations at the current progressive stage (the schedule's; the reference trainer's name)."""
        return self.progressive.prog_it

    # ------------------------------------------------------------------ tokens
    @torch.no_grad()
    def tokenise(self, inp_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] → token maps (B, pn²) of every scale, in float32."""
        with torch.autocast(device_type=inp_B3HW.device.type, enabled=False):
            return self.vae_local.img_to_idxBl(inp_B3HW)

    # ------------------------------------------------------------------ training
    def train_step(self, g_it: int, stepping: bool, label_B: torch.Tensor,
                   inp_B3HW: Optional[torch.Tensor] = None, gt_idx_Bl: Optional[List[torch.Tensor]] = None
                   ) -> Dict[str, object]:
        """One micro step at global iteration g_it. Give images (tokenised here) or their token maps.

        Trains the scales of g_it's progressive stage. Returns the loss and logits (detached, for metrics),
        the gradient norm, the loss scale (log2), whether the optimizer step was skipped for a non-finite
        gradient, and the stage (prog_si, -1: all scales) with its warm-up weight prog_wp.
        """
        prog_si, prog_wp = self.progressive.advance(g_it)
        B, V = label_B.shape[0], self.vae_local.vocab_size
        if gt_idx_Bl is None:
            gt_idx_Bl = self.tokenise(inp_B3HW)
        gt_idx_Bl = self.progressive.truncate(gt_idx_Bl, prog_si)
        gt_BL = torch.cat(gt_idx_Bl, dim=1)
        with torch.no_grad():
            x_BLCv_wo_first_l = self.quantize_local.idxBl_to_var_input(gt_idx_Bl)
            if x_BLCv_wo_first_l is None:  # progressive stage 0: only the first scale
                x_BLCv_wo_first_l = gt_BL.new_zeros(B, 0, self.vae_local.Cvae, dtype=torch.float32)

        sync_ctx = self.var.no_sync() if (not stepping and hasattr(self.var, 'no_sync')) else contextlib.nullcontext()
        with sync_ctx:
            with self.var_opt.amp_ctx:
                logits_BLV = self.var(label_B, x_BLCv_wo_first_l, prog_si=prog_si)
                loss_BL = self.train_loss(logits_BLV.view(-1, V), gt_BL.view(-1)).view(B, -1)
                loss = loss_BL.mul(self.progressive.loss_weight_1L(prog_si, prog_wp, loss_BL.device)).sum(dim=-1).mean()
            grad_norm, scale_log2, skipped = self.var_opt.backward_clip_step(loss=loss, stepping=stepping)
        if stepping and not skipped and self.ema is not None:
            self.ema.update(self.var_wo_ddp)
        return dict(loss=loss.detach(), logits_BLV=logits_BLV.detach(), gt_BL=gt_BL, grad_norm=grad_norm,
                    scale_log2=scale_log2, skipped=skipped, prog_si=prog_si, prog_wp=prog_wp)

    def scale_metrics(self, logits_BLV: torch.Tensor, gt_BL: torch.Tensor) -> Dict[str, float]:
        """Cross-entropy and accuracy (%) in total, on the last scale and per scale (keys L_<reso>, acc_<reso>)."""
        V = logits_BLV.shape[-1]
        L = logits_BLV.shape[1]
        out = {}
        pred_BL = logits_BLV.argmax(dim=-1)
        out['L_mean'] = self.val_loss(logits_BLV.reshape(-1, V), gt_BL.reshape(-1)).item()
        out['acc_mean'] = (pred_BL == gt_BL).float().mean().item() * 100
        if L == self.L:
            out['L_tail'] = self.val_loss(logits_BLV[:, -self.last_l:].reshape(-1, V), gt_BL[:, -self.last_l:].reshape(-1)).item()
            out['acc_tail'] = (pred_BL[:, -self.last_l:] == gt_BL[:, -self.last_l:]).float().mean().item() * 100
        for si, (bg, ed) in enumerate(self.begin_ends):
            if ed > L:
                break
            out[f'L_{self.resos[si]}'] = self.val_loss(logits_BLV[:, bg:ed].reshape(-1, V), gt_BL[:, bg:ed].reshape(-1)).item()
            out[f'acc_{self.resos[si]}'] = (pred_BL[:, bg:ed] == gt_BL[:, bg:ed]).float().mean().item() * 100
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_ep(self, ld_val, token_batches: bool = False) -> Tuple[float, float, float, float, int, float]:
        """Mean loss and accuracy over the validation set, in total and on the last scale, summed over processes.

        In float32 whatever --fp16 says, as the reference's eval_ep: vL, vacc and the choice of the best
        checkpoint do not depend on the training precision.
        """
        tot = 0
        L_mean = L_tail = acc_mean = acc_tail = 0.0
        stt = time.time()
        training = self.var_wo_ddp.training
        self.var_wo_ddp.eval()
        V = self.vae_local.vocab_size
        for batch in ld_val:
            if token_batches:
                gt_BL, label_B = batch
                gt_BL = gt_BL.to(self.device, non_blocking=True)
                gt_idx_Bl = [gt_BL[:, bg:ed] for bg, ed in self.begin_ends]
            else:
                inp_B3HW, label_B = batch
                gt_idx_Bl = self.tokenise(inp_B3HW.to(self.device, non_blocking=True))
                gt_BL = torch.cat(gt_idx_Bl, dim=1)
            label_B = label_B.to(self.device, non_blocking=True)
            B = label_B.shape[0]
            x_BLCv_wo_first_l = self.quantize_local.idxBl_to_var_input(gt_idx_Bl)
            logits_BLV = self.var_wo_ddp(label_B, x_BLCv_wo_first_l)
            L_mean += self.val_loss(logits_BLV.view(-1, V), gt_BL.view(-1)).item() * B
            L_tail += self.val_loss(logits_BLV[:, -self.last_l:].reshape(-1, V), gt_BL[:, -self.last_l:].reshape(-1)).item() * B
            acc_mean += (logits_BLV.argmax(dim=-1) == gt_BL).sum().item() * (100 / gt_BL.shape[1])
            acc_tail += (logits_BLV[:, -self.last_l:].argmax(dim=-1) == gt_BL[:, -self.last_l:]).sum().item() * (100 / self.last_l)
            tot += B
        self.var_wo_ddp.train(training)
        stats = torch.tensor([L_mean, L_tail, acc_mean, acc_tail, tot], dtype=torch.float64, device=self.device)
        dist.allreduce(stats)
        tot = round(stats[-1].item())
        stats /= max(tot, 1)
        L_mean, L_tail, acc_mean, acc_tail, _ = stats.tolist()
        return L_mean, L_tail, acc_mean, acc_tail, tot, time.time() - stt

    # ------------------------------------------------------------------ state
    def get_config(self) -> Dict:
        return {'patch_nums': self.patch_nums, 'resos': self.resos, 'label_smooth': self.label_smooth,
                **self.progressive.state_dict()}

    def state_dict(self) -> Dict:
        state = {'config': self.get_config()}
        for k in ('var_wo_ddp', 'vae_local'):
            m = getattr(self, k)
            m = getattr(m, '_orig_mod', m)
            state[k] = m.state_dict()
        state['var_opt'] = self.var_opt.state_dict()
        if self.ema is not None:
            state['var_ema'] = self.ema.state_dict(getattr(self.var_wo_ddp, '_orig_mod', self.var_wo_ddp))
        return state

    def load_state_dict(self, state: Dict, strict: bool = True, skip_vae: bool = True) -> None:
        var_wo_ddp = getattr(self.var_wo_ddp, '_orig_mod', self.var_wo_ddp)
        var_wo_ddp.load_state_dict(state['var_wo_ddp'], strict=strict)
        if not skip_vae:
            getattr(self.vae_local, '_orig_mod', self.vae_local).load_state_dict(state['vae_local'], strict=strict)
        var_opt = dict(state['var_opt'])
        var_opt['optimizer'] = match_saved_groups(var_opt['optimizer'], self.var_opt.optimizer)
        self.var_opt.load_state_dict(var_opt)
        if self.ema is not None:
            if 'var_ema' in state:
                self.ema.load_state_dict(state['var_ema'])
            else:  # EMA switched on when resuming: start it from the current weights
                self.ema = EMA(var_wo_ddp, self.ema.decay)
        self.progressive.load_state_dict(state.get('config', {}))

