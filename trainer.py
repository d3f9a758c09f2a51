"""One VAR training step (tokenise, teacher-forced forward, weighted cross-entropy, AMP backward) and evaluation;
`VARTask`, VAR's side of the training loop in utils/engine.py.

Letters: B batch, L tokens of all scales, l tokens of one scale, V vocabulary.
"""
import contextlib
import logging
import math
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import dist
from models import VAR, VQVAE
from utils.amp_opt import AmpOptimizer
from utils.engine import TrainingTask
from utils.lr_control import lr_wd_annealing, match_saved_groups
from utils.parallel import full_state_dict, grad_sync, is_sharded, local, lockstep_batches, reshard
from utils.progressive import ProgressiveSchedule
from utils.tb import TensorboardLogger
from utils.vis import ema_weights, fixed_classes, sample_grid, vis_epochs_due

__all__ = ['VARTrainer', 'EMA', 'VARTask']

logger = logging.getLogger('train')

PRETRAINED = 'pretrained'   # save_pretrained's folder of the final model


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # on this process's shards under --fsdp=1 (local views: the EMA DTensors change in place)
        torch._foreach_lerp_([local(e) for e in self.params], [local(p.detach()) for p in model.parameters()], 1 - self.decay)

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

        with grad_sync(self.var, stepping):
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
        for batch, counted in lockstep_batches(ld_val, is_sharded(self.var_wo_ddp)):
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
            if not counted:   # a repeated batch that only keeps the processes' collectives in step (--fsdp=1)
                continue
            L_mean += self.val_loss(logits_BLV.view(-1, V), gt_BL.view(-1)).item() * B
            L_tail += self.val_loss(logits_BLV[:, -self.last_l:].reshape(-1, V), gt_BL[:, -self.last_l:].reshape(-1)).item() * B
            acc_mean += (logits_BLV.argmax(dim=-1) == gt_BL).sum().item() * (100 / gt_BL.shape[1])
            acc_tail += (logits_BLV[:, -self.last_l:].argmax(dim=-1) == gt_BL[:, -self.last_l:]).sum().item() * (100 / self.last_l)
            tot += B
        self.var_wo_ddp.train(training)
        reshard(self.var_wo_ddp)   # --fsdp=1: the shards are the parameters again
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



class VARTask(TrainingTask):
    """VAR in the training loop (utils/engine.py): learning-rate schedule, per-scale metrics, validation (best: the lowest
    loss on the last scale), a tensorboard sample grid every --vis_every_ep epochs, save_pretrained/push_to_hub at the end."""
    pbar_desc = 'train'
    rng_rule = ('torch.manual_seed(iteration_seed(seed, rank, g_it)) before each iteration; '
                'augmentation seeded by (seed, epoch, index)')

    def __init__(self, trainer: VARTrainer, args, out_dir: str, ld_val, token_batches: bool):
        self.trainer, self.args, self.out_dir, self.ld_val, self.token_batches = trainer, args, out_dir, ld_val, token_batches
        self.best = {'vL_tail': math.inf, 'vL_mean': math.inf, 'vacc_tail': -1.0, 'vacc_mean': -1.0}
        self.lr_wd = (0.0, 0.0, 0.0, 0.0)   # min/max learning rate, min/max weight decay of the last step
        self.val_images_sec = (0, 0.0)
        self.grid = None                     # the last tensorboard sample grid, for the model card
        self.full_state = None               # --fsdp=1: the final weights gathered on rank 0 for publish()

    def describe(self, iters_train: int) -> str:
        a = self.args
        return (f'training: {a.ep} epochs x {iters_train} iterations, global batch {a.bs} ({a.batch_size} per process, '
                f'{a.ac} accumulation steps), lr {a.tlr:.3g}')

    def modules(self) -> Dict[str, nn.Module]:
        return {'var': self.trainer.var_wo_ddp}

    def model_config(self) -> Dict:
        return self.args.model_config()   # the tokenizer's and the VAR's configs (models/config.py)

    def state_dict(self) -> Dict:
        return self.trainer.state_dict()

    def load_state_dict(self, ckpt: Dict) -> None:
        """Resume from a train.py checkpoint (the tokenizer's weights come from --vae_ckpt, not from it)."""
        self.trainer.load_state_dict(ckpt['trainer'], strict=True, skip_vae=True)
        self.best.update(ckpt.get('best', {}))

    def train_step(self, g_it: int, stepping: bool, batch, plan) -> Dict[str, object]:
        a, tr = self.args, self.trainer
        data, label_B = batch
        label_B = label_B.to(tr.device, non_blocking=True)
        self.lr_wd = lr_wd_annealing(a.sche, tr.var_opt.optimizer, a.tlr, a.twd, a.twde, g_it, plan.wp_it, plan.max_it, wp0=a.wp0, wpe=a.wpe)
        if self.token_batches:
            gt_BL = data.to(tr.device, non_blocking=True)
            return tr.train_step(g_it, stepping, label_B, gt_idx_Bl=[gt_BL[:, bg:ed] for bg, ed in tr.begin_ends])
        return tr.train_step(g_it, stepping, label_B, inp_B3HW=data.to(tr.device, non_blocking=True))

    def log_iter(self, g_it: int, out: Dict[str, object], tb: TensorboardLogger, imgs_per_sec: float,
                 skipped_steps: int) -> Tuple[Dict[str, float], Dict[str, str]]:
        m = self.trainer.scale_metrics(out['logits_BLV'], out['gt_BL'])
        min_tlr, max_tlr, min_twd, max_twd = self.lr_wd
        tb.update('AR_iter_loss', g_it, **m)
        tb.update('AR_opt', g_it, lr_max=max_tlr, lr_min=min_tlr, wd_max=max_twd, wd_min=min_twd,
                  grad_norm=out['grad_norm'], loss_scale_log2=out['scale_log2'], skipped_steps=skipped_steps)
        tb.update('AR_speed', g_it, images_per_sec=imgs_per_sec)
        tb.update('AR_iter_schedule', g_it, prog_si=out['prog_si'], prog_wp=out['prog_wp'])
        ep_scalars = {k: m[k] for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail') if k in m}
        return ep_scalars, dict(loss=f'{m["L_mean"]:.3f}', acc=f'{m["acc_mean"]:.1f}', lr=f'{max_tlr:.2e}')

    def epoch_fields(self, skipped_steps: int, skipped_images: int) -> Dict:
        return {'tlr': self.lr_wd[1], 'twd': self.lr_wd[3], **super().epoch_fields(skipped_steps, skipped_images)}

    def evaluate(self, ep_done: int) -> Tuple[Dict[str, float], bool]:
        vL_mean, vL_tail, vacc_mean, vacc_tail, tot, cost = self.trainer.eval_ep(self.ld_val, token_batches=self.token_batches)
        best, self.val_images_sec = self.best, (tot, cost)
        improved = vL_tail < best['vL_tail']
        best.update(vL_tail=min(best['vL_tail'], vL_tail), vL_mean=min(best['vL_mean'], vL_mean),
                    vacc_tail=max(best['vacc_tail'], vacc_tail), vacc_mean=max(best['vacc_mean'], vacc_mean))
        return dict(vL_mean=vL_mean, vL_tail=vL_tail, vacc_mean=vacc_mean, vacc_tail=vacc_tail), improved

    def report_eval(self, ep_done: int, metrics: Dict[str, float], tb: TensorboardLogger) -> Dict:
        tot, cost = self.val_images_sec
        logger.info('[ep %d] val (%d images, %.1fs): loss %.4f, last scale %.4f, acc %.2f%%, last scale %.2f%%',
                    ep_done, tot, cost, metrics['vL_mean'], metrics['vL_tail'], metrics['vacc_mean'], metrics['vacc_tail'])
        tb.update('AR_ep_loss', ep_done, **metrics)
        return {**{k: round(v, 5) for k, v in metrics.items()}, 'val_images': tot, 'best_vL_tail': round(self.best['vL_tail'], 5)}

    def report_epoch(self, ep_done: int, stats: Dict[str, float], sec: float, remain: float) -> None:
        logger.info('[ep %d/%d] loss %.4f acc %.2f%% | %.1fs/epoch, %.2f h left', ep_done, self.args.ep, stats.get('L_mean', float('nan')),
                    stats.get('acc_mean', float('nan')), sec, remain / 3600)

    def end_epoch(self, ep_done: int, stats: Dict[str, float], remain: float, tb: TensorboardLogger) -> None:
        tb.update('AR_ep_loss', ep_done, **stats)
        tb.update('AR_z_burnout', ep_done, rest_hours=remain / 3600)
        # sampling with sharded weights is a collective: every process draws, rank 0 writes the grid (tb is rank 0's only)
        drawing = dist.is_master() or is_sharded(self.trainer.var_wo_ddp)
        if drawing and vis_epochs_due(ep_done, self.args.ep, self.args.vis_every_ep):
            self.grid = self.draw_sample_grid(tb, ep_done)

    def draw_sample_grid(self, tb: TensorboardLogger, ep_done: int):
        """Samples of fixed classes and seeds from the EMA weights (the trained ones without --ema), to tensorboard; the grid."""
        t0, tr = time.time(), self.trainer
        with ema_weights(tr.var_wo_ddp, tr.ema) as var:
            try:   # a picture for tensorboard must not take the run (and its end-of-epoch checkpoint) down
                grid = sample_grid(var, fixed_classes(self.args.num_classes), seed=self.args.seed, amp_ctx=tr.var_opt.amp_ctx)
            except RuntimeError as e:   # diverged weights: "probability tensor contains either inf, nan or element < 0"
                logger.warning('[ep %d] no tensorboard sample grid: sampling failed (%s); the weights may have diverged',
                               ep_done, str(e).splitlines()[0])
                return None
        tb.image('AR_samples/fixed_classes_and_seeds', ep_done, grid)
        logger.info('[ep %d] tensorboard sample grid (%s weights): %.2fs', ep_done, 'EMA' if tr.ema else 'trained', time.time() - t0)
        return grid

    def finish(self) -> None:
        logger.info('finished %d epochs; checkpoints in %s', self.args.ep, self.out_dir)
        tr = self.trainer
        if is_sharded(tr.var_wo_ddp) and (self.args.save_pretrained or self.args.push_to_hub):
            with ema_weights(tr.var_wo_ddp, tr.ema) as var:   # gathering the shards is a collective: every process, now
                self.full_state = full_state_dict(var)

    def _final_model(self):
        """The model publish() writes: the trained one with its EMA weights swapped in, or (--fsdp=1) an unsharded copy of it."""
        tr = self.trainer
        if not is_sharded(tr.var_wo_ddp):
            return ema_weights(tr.var_wo_ddp, tr.ema)
        from models import build_var
        from utils.arg_util import var_config_from_flags
        var = build_var(var_config_from_flags(self.args), tr.vae_local, device='cpu', flash_if_available=self.args.fuse,
                        fused_if_available=self.args.fuse)
        var.load_state_dict(self.full_state, strict=True)
        return contextlib.nullcontext(var)

    def publish(self, metrics: Dict[str, float]) -> None:
        """save_pretrained into out_dir/pretrained and/or push_to_hub the final model (its EMA weights with --ema), with a model card."""
        args, tr = self.args, self.trainer
        if not (args.save_pretrained or args.push_to_hub):
            return
        card = dict(command=f'train.py {args.cmd}', dataset=args.tokens_path or args.data_path, epochs=args.ep, metrics=dict(metrics),
                    weights=f'EMA of the trained weights (decay {args.ema:g})' if tr.ema else 'the trained weights (no EMA)',
                    sample_grid=self.grid)
        with self._final_model() as var:
            var.class_names = self.class_names   # written beside the weights as classes.json
            if args.save_pretrained:
                folder = osp.join(self.out_dir, PRETRAINED)
                var.save_pretrained(folder, model_card_kwargs=card)
                logger.info('final model saved with save_pretrained: %s (VAR.from_pretrained or models.load_pretrained reads it)', folder)
            if args.push_to_hub:
                url = var.push_to_hub(args.push_to_hub, model_card_kwargs=card, commit_message=f'train.py: {args.ep} epochs')
                logger.info('final model pushed to the Hugging Face repo %s: %s', args.push_to_hub, url)
