"""One tokenizer training step (reconstruction, multi-scale vq, perceptual and adversarial losses) and its evaluation;
`VQVAETask`, the tokenizer's side of the training loop in utils/engine.py; `ReconstructionNpz`, the val set's
reconstructions and originals as two .npz files for rFID.

Letters: B batch, C = Cvae latent channels, H/W image side, h/w latent side, V vocabulary, SN scales.
"""
import logging
import math
import os.path as osp
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.dataloader import default_collate

import dist
from models import VQVAE
from models.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from models.weights import save_weights
from utils.amp_opt import AmpOptimizer
from utils.arg_util import vqvae_config_from_flags
from utils.ckpt import save_atomic
from utils.engine import TrainingTask
from utils.imgs import to_uint8_BHW3
from utils.lr_control import lr_wd_annealing
from utils.metrics import psnr, ssim
from utils.misc import NpzWriter
from utils.parallel import full_state_dict, grad_sync, is_sharded, lockstep_batches, reshard
from utils.tb import TensorboardLogger
from utils.vis import reconstruction_grids

__all__ = ['VQVAETrainer', 'VQVAETask', 'ReconstructionNpz', 'ref_npz_path', 'export_weights']

logger = logging.getLogger('train_vae')

EXPORT, EXPORT_SAFETENSORS = 'vae.pth', 'vae.safetensors'   # the same weights; vae.pth is still written for one release, then only this


def export_weights(vae: VQVAE, out_dir: str) -> None:
    """The tokenizer's weights as plain files for train.py --vae_ckpt: vae.safetensors, and vae.pth for one more release.
    Every process calls it (gathering --fsdp=1's shards is a collective); the local master writes (rank 0 with --fsdp=1)."""
    state = full_state_dict(vae)
    if state is None or not dist.is_local_master():
        return
    save_weights(state, osp.join(out_dir, EXPORT_SAFETENSORS))
    save_atomic(state, osp.join(out_dir, EXPORT))


def log_reconstructions(tb: TensorboardLogger, vae: VQVAE, val_set, step: int, device: torch.device, amp_ctx, n: int = 4) -> None:
    """The first n val images beside their reconstructions, from all scales and from every prefix of scales, to tensorboard."""
    t0 = time.time()
    inp_B3HW = torch.stack([val_set[i][0] for i in range(min(n, len(val_set)))]).to(device)
    for name, grid in reconstruction_grids(vae, inp_B3HW, amp_ctx).items():
        tb.image(f'VAE_reconstructions/{name}', step, grid)
    logger.info('[ep %d] tensorboard reconstructions of %d val images: %.2fs', step, len(inp_B3HW), time.time() - t0)


def ref_npz_path(recon_npz: str) -> str:
    """Where the originals go beside --recon_npz: <stem>_ref.npz."""
    return recon_npz[:-len('.npz')] + '_ref.npz'


class ReconstructionNpz:
    """--recon_npz: the val images' reconstructions from all scales (arr_0 (N, H, W, 3) uint8, in the val folder's order) and
    the images the tokenizer saw (<stem>_ref.npz), each with a manifest, streamed to disk and published atomically.

    The val set is cut into blocks of `bs` consecutive indices, block b on process b mod world (as sample.py does); after
    each step rank 0 gathers the processes' blocks, which are then consecutive, and appends them to both files. So the
    files do not depend on the number of processes, and rank 0 holds one step's images at a time. Every process knows how
    many steps there are, so one with fewer blocks repeats its last batch, not counted, without asking the others.
    """

    def __init__(self, path: str, val_set, bs: int, manifests: Tuple[Dict, Dict]):
        self.path, self.val_set, self.manifests = path, val_set, manifests
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        n = len(val_set)
        blocks = [list(range(b, min(b + bs, n))) for b in range(0, n, bs)]
        self.mine: List[List[int]] = blocks[self.rank::self.world]
        self.steps = math.ceil(len(blocks) / self.world)   # gathers every process makes, with or without a block
        self.gathered = 0
        self.writers: Optional[Tuple[NpzWriter, NpzWriter]] = None
        if dist.is_master():
            side = val_set.final_reso
            self.writers = NpzWriter(path, n, side, side), NpzWriter(ref_npz_path(path), n, side, side)

    def loader(self, workers: int, pin_memory: bool) -> DataLoader:
        """This process's blocks, in order."""
        return DataLoader(self.val_set, batch_sampler=self.mine, num_workers=workers, pin_memory=pin_memory)

    def lockstep(self, loader: DataLoader) -> Iterator[Tuple[object, bool]]:
        """(batch, counted) of loader (this object's loader()), then repeats up to the number of steps of the process with the
        most blocks: the gathers, and FSDP2's weight gathers, happen in the same order on every process."""
        last = None
        for batch in loader:
            last = batch
            yield batch, True
        for _ in range(self.steps - len(self.mine)):
            yield (default_collate([self.val_set[0]]) if last is None else last), False

    def add(self, inp_B3HW: Optional[torch.Tensor], rec_B3HW: Optional[torch.Tensor]) -> None:
        """One step of validation (every process calls it; None for a repeated batch that is not counted): inputs and
        reconstructions (B, 3, H, W) in [-1, 1] of this process's next block."""
        payload = None
        if inp_B3HW is not None:
            payload = (self.mine[self.gathered][0], to_uint8_BHW3((rec_B3HW + 1) / 2), to_uint8_BHW3((inp_B3HW + 1) / 2))
        parts = dist.all_gather_object(payload)
        self.gathered += 1
        if self.writers is None:
            return
        rec_w, ref_w = self.writers
        for part in parts:
            if part is None:
                continue
            start, rec_bHW3, ref_bHW3 = part
            if start != rec_w.written:   # the blocks' order is what makes the files independent of the process count
                raise RuntimeError(f'{self.path}: a block starting at image {start} arrived after {rec_w.written} images')
            rec_w.write(rec_bHW3)
            ref_w.write(ref_bHW3)

    def finish(self) -> Tuple[str, str]:
        """After the last step: the two files published by rank 0."""
        if self.gathered != self.steps:
            raise RuntimeError(f'{self.path}: {self.gathered} of {self.steps} steps gathered')
        replaced = dist.allreduce(self.val_set.n_skipped.clone().double()).item()   # unreadable images stood in for by the next
        if self.writers is not None:
            rec_m, ref_m = self.manifests
            for w, m in zip(self.writers, (rec_m, ref_m)):
                w.close({**m, 'pixels': {**m['pixels'], 'unreadable_replaced': int(replaced)}})
            if replaced:
                logger.warning('%d unreadable val images were replaced by the next readable one, in both files', int(replaced))
        dist.barrier()
        return self.path, ref_npz_path(self.path)

    def discard(self) -> None:
        if self.writers is not None:
            for w in self.writers:
                w.discard()


class VQVAETrainer:
    def __init__(self, device: torch.device, vae_wo_ddp: VQVAE, vae: nn.Module, vae_opt: AmpOptimizer,
                 disc_wo_ddp: Optional[nn.Module] = None, disc: Optional[nn.Module] = None, disc_opt: Optional[AmpOptimizer] = None,
                 lpips: Optional[nn.Module] = None, rec_loss: str = 'l1', rec_weight: float = 1.0, vq_weight: float = 1.0,
                 lpips_weight: float = 0.0, disc_start: int = -1, disc_weight: float = 0.5, dead_threshold: float = 0.03):
        self.device = device
        self.vae_wo_ddp, self.vae, self.vae_opt = vae_wo_ddp, vae, vae_opt
        self.disc_wo_ddp, self.disc, self.disc_opt = disc_wo_ddp, disc, disc_opt
        self.lpips = lpips
        self.rec_loss, self.rec_weight, self.vq_weight = rec_loss, rec_weight, vq_weight
        self.lpips_weight = lpips_weight if lpips is not None else 0.0
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.dead_threshold = dead_threshold
        self.n_reinit = 0

    def disc_active(self, g_it: int) -> bool:
        return self.disc is not None and 0 <= self.disc_start <= g_it

    # ------------------------------------------------------------------ training
    def train_step(self, g_it: int, stepping: bool, inp_B3HW: torch.Tensor) -> Dict[str, object]:
        """One micro step of the tokenizer (and of the discriminator once it has started)."""
        use_disc = self.disc_active(g_it)
        out: Dict[str, object] = {}
        with grad_sync(self.vae, stepping):
            with self.vae_opt.amp_ctx:
                rec_B3HW, _, vq_loss = self.vae(inp_B3HW)
                rec_B3HW = rec_B3HW.float()
                if self.rec_loss == 'l1':
                    rec_loss = (rec_B3HW - inp_B3HW).abs().mean()
                else:
                    rec_loss = F.mse_loss(rec_B3HW, inp_B3HW)
                nll = self.rec_weight * rec_loss
                if self.lpips_weight > 0:
                    p_loss = self.lpips(rec_B3HW, inp_B3HW).mean()
                    nll = nll + self.lpips_weight * p_loss
                    out['lpips'] = p_loss.detach()
                loss = nll + self.vq_weight * vq_loss
                if use_disc:
                    for p in self.disc_wo_ddp.parameters():
                        p.requires_grad_(False)
                    g_loss = hinge_g_loss(self.disc_wo_ddp(rec_B3HW))
                    for p in self.disc_wo_ddp.parameters():
                        p.requires_grad_(True)
                    d_weight = adaptive_weight(nll, g_loss, self.vae_wo_ddp.decoder.conv_out.weight) * self.disc_weight
                    loss = loss + d_weight * g_loss
                    out.update(g_loss=g_loss.detach(), d_weight=d_weight)
            grad_norm, scale_log2, skipped = self.vae_opt.backward_clip_step(stepping=stepping, loss=loss)

        if use_disc:
            with grad_sync(self.disc, stepping):
                with self.disc_opt.amp_ctx:
                    d_loss = hinge_d_loss(self.disc(inp_B3HW.detach()).float(), self.disc(rec_B3HW.detach()).float())
                d_grad_norm, _, d_skipped = self.disc_opt.backward_clip_step(stepping=stepping, loss=d_loss)
            out.update(d_loss=d_loss.detach(), d_grad_norm=d_grad_norm)
            skipped = skipped or d_skipped
        out.update(loss=loss.detach(), rec_loss=rec_loss.detach(), vq_loss=vq_loss.detach(), grad_norm=grad_norm,
                   scale_log2=scale_log2, skipped=skipped)
        return out

    @torch.no_grad()
    def reinit_dead_codes(self, inp_B3HW: torch.Tensor) -> int:
        """Give codebook entries whose EMA hits fell below dead_threshold × a uniform share new values:
        latent vectors of the current batch (rank 0's, broadcast). Returns how many were re-initialised."""
        q = self.vae_wo_ddp.quantize
        hits_V = q.ema_vocab_hit_SV.sum(0)
        expected = hits_V.sum() / q.vocab_size
        dead_V = hits_V < self.dead_threshold * expected
        n = int(dead_V.sum())
        if n == 0 or expected <= 0:
            return 0
        new_nC = torch.zeros(n, q.Cvae, device=q.embedding.weight.device)
        if dist.is_master():
            with torch.autocast(device_type=inp_B3HW.device.type, enabled=False):
                f_BChw = self.vae_wo_ddp.encode(inp_B3HW.float())
            f_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, q.Cvae)
            pick = torch.randint(0, f_NC.shape[0], (n,), device=f_NC.device)
            new_nC = f_NC[pick] + 0.01 * f_NC.std() * torch.randn(n, q.Cvae, device=f_NC.device)
        dist.broadcast(new_nC, src=0)
        q.embedding.weight.data[dead_V] = new_nC.to(q.embedding.weight.dtype)
        q.ema_vocab_hit_SV[:, dead_V] = expected / q.ema_vocab_hit_SV.shape[0]
        state = self.vae_opt.optimizer.state.get(q.embedding.weight, {})
        for k in ('exp_avg', 'exp_avg_sq'):
            if k in state:
                state[k][dead_V] = 0
        self.n_reinit += n
        return n

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, ld_val, recon: Optional[ReconstructionNpz] = None) -> Dict[str, float]:
        """PSNR, SSIM and L1 of the reconstructions from all scales, and the % of codebook entries used per scale.
        With `recon`, ld_val is recon.loader() and each batch's images also go to its files (a process with fewer blocks
        runs one repeated, uncounted batch)."""
        vae = self.vae_wo_ddp
        training = vae.training
        vae.eval()
        stt = time.time()
        SN = len(vae.quantize.v_patch_nums)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)   # psnr, ssim, l1, count
        hits_SV = torch.zeros(SN, vae.vocab_size, device=self.device)
        batches = lockstep_batches(ld_val, is_sharded(vae)) if recon is None else recon.lockstep(ld_val)
        for (inp_B3HW, _), counted in batches:
            inp_B3HW = inp_B3HW.to(self.device, non_blocking=True)
            with self.vae_opt.amp_ctx:
                idx_Bl = vae.img_to_idxBl(inp_B3HW)
                rec_B3HW = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).float()
            if recon is not None:
                recon.add(inp_B3HW if counted else None, rec_B3HW)
            if not counted:   # a repeated batch that only keeps the processes' collectives in step (--fsdp=1)
                continue
            x01, r01 = (inp_B3HW + 1) / 2, (rec_B3HW + 1) / 2
            sums[0] += psnr(r01, x01).sum().double()
            sums[1] += ssim(r01, x01).sum().double()
            sums[2] += (rec_B3HW - inp_B3HW).abs().flatten(1).mean(1).sum().double()
            sums[3] += inp_B3HW.shape[0]
            for si, idx in enumerate(idx_Bl):
                hits_SV[si] += idx.flatten().bincount(minlength=vae.vocab_size).float()
        if recon is not None:
            recon.finish()
        dist.allreduce(sums)
        dist.allreduce(hits_SV)
        vae.train(training)
        reshard(vae)   # --fsdp=1: the shards are the parameters again
        n = max(sums[3].item(), 1)
        out = {'psnr': sums[0].item() / n, 'ssim': sums[1].item() / n, 'l1': sums[2].item() / n, 'images': int(sums[3].item()),
               'sec': time.time() - stt}
        for si, pn in enumerate(vae.quantize.v_patch_nums):
            out[f'usage_{pn}'] = (hits_SV[si] > 0).float().mean().item() * 100
        out['usage_all'] = (hits_SV.sum(0) > 0).float().mean().item() * 100
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        sd = {'vae_wo_ddp': self.vae_wo_ddp.state_dict(), 'vae_opt': self.vae_opt.state_dict(),
              'config': {'n_reinit': self.n_reinit, 'record_hit': self.vae_wo_ddp.quantize.record_hit}}
        if self.disc_wo_ddp is not None:
            sd['disc'] = self.disc_wo_ddp.state_dict()
            sd['disc_opt'] = self.disc_opt.state_dict()
        return sd

    def load_state_dict(self, sd: Dict) -> None:
        self.vae_wo_ddp.load_state_dict(sd['vae_wo_ddp'], strict=True)
        self.vae_opt.load_state_dict(sd['vae_opt'])
        if self.disc_wo_ddp is not None and 'disc' in sd:
            self.disc_wo_ddp.load_state_dict(sd['disc'], strict=True)
            self.disc_opt.load_state_dict(sd['disc_opt'])
        cfg = sd.get('config', {})
        self.n_reinit = cfg.get('n_reinit', 0)
        self.vae_wo_ddp.quantize.record_hit = cfg.get('record_hit', 0)


class VQVAETask(TrainingTask):
    """The tokenizer in the training loop (utils/engine.py): learning-rate schedules, dead-code re-initialisation, codebook usage,
    validation (best: the highest PSNR) with reconstruction grids, and the exported vae.safetensors / vae.pth."""
    pbar_desc = 'train_vae'

    def __init__(self, trainer: VQVAETrainer, args, out_dir: str, val_set, ld_val):
        self.trainer, self.args, self.out_dir, self.val_set, self.ld_val = trainer, args, out_dir, val_set, ld_val
        self.best = {'psnr': -math.inf}
        self.positions = args.batch_size * args.patch_nums[-1] ** 2

    def describe(self, iters_train: int) -> str:
        a, tr = self.args, self.trainer
        return (f'training: {a.ep} epochs x {iters_train} iterations, global batch {a.bs} ({a.batch_size} per process), lr {a.lr:.3g}, '
                f'losses: {a.rec_loss}' + (' + lpips' if tr.lpips is not None else '')
                + (f' + adversarial from iteration {a.disc_start}' if tr.disc is not None else ''))

    def modules(self) -> Dict[str, nn.Module]:
        tr = self.trainer
        return {'vae': tr.vae_wo_ddp, **({'disc': tr.disc_wo_ddp} if tr.disc_wo_ddp is not None else {})}

    def model_config(self) -> Dict:
        return {'vqvae': vqvae_config_from_flags(self.args).to_dict()}   # models/config.py

    def state_dict(self) -> Dict:
        return self.trainer.state_dict()

    def load_state_dict(self, ckpt: Dict) -> None:
        self.trainer.load_state_dict(ckpt['trainer'])
        self.best.update(ckpt.get('best', {}))

    def train_step(self, g_it: int, stepping: bool, batch, plan) -> Dict[str, object]:
        a, tr = self.args, self.trainer
        inp_B3HW = batch[0].to(tr.device, non_blocking=True)
        lr_wd_annealing(a.sche, tr.vae_opt.optimizer, a.lr, a.wd, a.wd, g_it, plan.wp_it, plan.max_it, wp0=a.wp0, wpe=a.wpe)
        if tr.disc_opt is not None:
            lr_wd_annealing(a.sche, tr.disc_opt.optimizer, a.disc_lr, a.wd, a.wd, g_it, plan.wp_it, plan.max_it, wp0=a.wp0, wpe=a.wpe)
        out = tr.train_step(g_it, stepping, inp_B3HW)
        if stepping and a.reinit_dead > 0 and (g_it + 1) % a.reinit_dead == 0:
            n = tr.reinit_dead_codes(inp_B3HW)
            if n:
                logger.info('iteration %d: re-initialised %d unused codebook entries', g_it, n)
        return out

    def log_iter(self, g_it: int, out: Dict[str, object], tb: TensorboardLogger, imgs_per_sec: float,
                 skipped_steps: int) -> Tuple[Dict[str, float], Dict[str, str]]:
        tr, patch_nums = self.trainer, self.args.patch_nums
        scalars = {k: float(out[k]) for k in ('loss', 'rec_loss', 'vq_loss', 'lpips', 'g_loss', 'd_loss', 'd_weight') if k in out}
        usages = tr.vae_wo_ddp.quantize.usages_percent(self.positions)
        tb.update('VAE_iter_loss', g_it, **scalars)
        tb.update('VAE_codebook_usage', g_it, **{f'scale_{pn}': u for pn, u in zip(patch_nums, usages)}, reinitialised=tr.n_reinit)
        tb.update('VAE_opt', g_it, lr=tr.vae_opt.optimizer.param_groups[0]['lr'], grad_norm=out['grad_norm'],
                  loss_scale_log2=out['scale_log2'], skipped_steps=skipped_steps)
        tb.update('VAE_speed', g_it, images_per_sec=imgs_per_sec)
        return scalars, dict(rec=f'{scalars["rec_loss"]:.4f}', vq=f'{scalars["vq_loss"]:.4f}', use=f'{sum(usages) / len(usages):.0f}%')

    def epoch_fields(self, skipped_steps: int, skipped_images: int) -> Dict:
        return {**super().epoch_fields(skipped_steps, skipped_images), 'reinitialised': self.trainer.n_reinit}

    def evaluate(self, ep_done: int) -> Tuple[Dict[str, float], bool]:
        metrics = self.trainer.evaluate(self.ld_val)
        improved = metrics['psnr'] > self.best['psnr']
        self.best['psnr'] = max(self.best['psnr'], metrics['psnr'])
        return metrics, improved

    def report_eval(self, ep_done: int, metrics: Dict[str, float], tb: TensorboardLogger) -> Dict:
        logger.info('[ep %d] val: PSNR %.2f dB, SSIM %.4f, L1 %.4f; codebook usage %s', ep_done, metrics['psnr'], metrics['ssim'],
                    metrics['l1'], ', '.join(f'{pn}: {metrics[f"usage_{pn}"]:.1f}%' for pn in self.args.patch_nums))
        tb.update('VAE_val', ep_done, **{k: v for k, v in metrics.items() if k not in ('images', 'sec')})
        if dist.is_master() or is_sharded(self.trainer.vae_wo_ddp):   # with shards a collective; tb writes on rank 0 only
            log_reconstructions(tb, self.trainer.vae_wo_ddp, self.val_set, ep_done, self.trainer.device, self.trainer.vae_opt.amp_ctx)
        return {k: round(v, 5) for k, v in metrics.items()}

    def report_epoch(self, ep_done: int, stats: Dict[str, float], sec: float, remain: float) -> None:
        logger.info('[ep %d/%d] rec %.4f vq %.4f | %.1fs/epoch', ep_done, self.args.ep, stats.get('rec_loss', math.nan),
                    stats.get('vq_loss', math.nan), sec)

    def after_epoch_checkpoint(self, stepped: bool) -> None:
        if stepped:
            export_weights(self.trainer.vae_wo_ddp, self.out_dir)

    def finish(self) -> None:
        export_weights(self.trainer.vae_wo_ddp, self.out_dir)
        logger.info('finished %d epochs; tokenizer weights for train.py --vae_ckpt: %s (and %s, for one more release)', self.args.ep,
                    osp.join(self.out_dir, EXPORT_SAFETENSORS), EXPORT)
