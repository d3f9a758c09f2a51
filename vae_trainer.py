"""One tokenizer training step (reconstruction, multi-scale vq, perceptual and adversarial losses) and its evaluation.

Letters: B batch, C = Cvae latent channels, H/W image side, h/w latent side, V vocabulary, SN scales.
"""
import contextlib
import time
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import dist
from models import VQVAE
from models.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss
from utils.amp_opt import AmpOptimizer
from utils.metrics import psnr, ssim

__all__ = ['VQVAETrainer']


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
        no_sync = (lambda m: m.no_sync()) if not stepping else (lambda m: contextlib.nullcontext())
        vae_ctx = no_sync(self.vae) if hasattr(self.vae, 'no_sync') else contextlib.nullcontext()
        out: Dict[str, object] = {}
        with vae_ctx:
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
            d_ctx = no_sync(self.disc) if hasattr(self.disc, 'no_sync') else contextlib.nullcontext()
            with d_ctx:
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
    def evaluate(self, ld_val) -> Dict[str, float]:
        """PSNR, SSIM and L1 of the reconstructions from all scales, and the % of codebook entries used per scale."""
        vae = self.vae_wo_ddp
        training = vae.training
        vae.eval()
        stt = time.time()
        SN = len(vae.quantize.v_patch_nums)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)   # psnr, ssim, l1, count
        hits_SV = torch.zeros(SN, vae.vocab_size, device=self.device)
        for inp_B3HW, _ in ld_val:
            inp_B3HW = inp_B3HW.to(self.device, non_blocking=True)
            with self.vae_opt.amp_ctx:
                idx_Bl = vae.img_to_idxBl(inp_B3HW)
                rec_B3HW = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).float()
            x01, r01 = (inp_B3HW + 1) / 2, (rec_B3HW + 1) / 2
            sums[0] += psnr(r01, x01).sum().double()
            sums[1] += ssim(r01, x01).sum().double()
            sums[2] += (rec_B3HW - inp_B3HW).abs().flatten(1).mean(1).sum().double()
            sums[3] += inp_B3HW.shape[0]
            for si, idx in enumerate(idx_Bl):
                hits_SV[si] += idx.flatten().bincount(minlength=vae.vocab_size).float()
        dist.allreduce(sums)
        dist.allreduce(hits_SV)
        vae.train(training)
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
