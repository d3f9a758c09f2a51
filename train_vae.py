"""Train the multi-scale VQVAE tokenizer from scratch, or fine-tune the published one (--vae_ckpt).

    torchrun --nproc_per_node=8 train_vae.py --data_path=/path/to/imagenet --bs=256 --ep=40 --fp16=2
    python train_vae.py --data_path=... --eval_only=1 --vae_ckpt=vae_ch160v4096z32.pth     # PSNR, SSIM, codebook usage

Same data folders, mixed precision, resume-at-any-moment, atomic checkpoints, tensorboard and
progress bar as train.py. The tokenizer's weights are also exported as `vae.safetensors` (and, for one
more release, `vae.pth`), a plain state dict that loads strictly into VQVAE / build_vae_var and works as
`train.py --vae_ckpt`. Every validation puts input/reconstruction pairs in tensorboard.
"""
import logging
import math
import os.path as osp
import time
from typing import Dict

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dist
from models import VQVAE, build_vqvae
from models.state_dict import CheckpointMismatchError
from models.discriminator import PatchDiscriminator
from utils.amp_opt import AmpOptimizer, build_adamw
from utils.arg_util import VAE_MODEL_KEYS, VAEArgs, parse_vae_args, vqvae_config_from_flags
from utils.ckpt import save_atomic
from utils.cli import UserError, run_main
from utils.data import build_dataset
from utils.lr_control import filter_params, lr_wd_annealing
from utils.run import (CheckpointWriter, NonFiniteGuard, append_log, build_loaders, check_resume_config, iteration_seed, resume,
                       plan_iterations, setup_run)
from utils.tb import TensorboardLogger
from utils.vis import reconstruction_grids
from utils.weights import load_tokenizer_state, save_weights
from vae_trainer import VQVAETrainer

logger = logging.getLogger('train_vae')

LAST, PREV, BEST, EXPORT = 'vae-ckpt-last.pth', 'vae-ckpt-prev.pth', 'vae-ckpt-best.pth', 'vae.pth'
EXPORT_SAFETENSORS = 'vae.safetensors'   # the same weights; vae.pth is still written for one release, then only this


def build_vae(args: VAEArgs, device: torch.device) -> VQVAE:
    return build_vqvae(vqvae_config_from_flags(args), device, test_mode=False, beta=args.beta)


def export_weights(vae: VQVAE, out_dir: str) -> None:
    """The tokenizer's weights as plain files for train.py --vae_ckpt: vae.safetensors, and vae.pth for one more release."""
    state = vae.state_dict()
    save_weights(state, osp.join(out_dir, EXPORT_SAFETENSORS))
    save_atomic(state, osp.join(out_dir, EXPORT))


def log_reconstructions(tb: TensorboardLogger, vae: VQVAE, val_set, step: int, device: torch.device, amp_ctx, n: int = 4) -> None:
    """The first n val images beside their reconstructions, from all scales and from every prefix of scales, to tensorboard."""
    t0 = time.time()
    inp_B3HW = torch.stack([val_set[i][0] for i in range(min(n, len(val_set)))]).to(device)
    for name, grid in reconstruction_grids(vae, inp_B3HW, amp_ctx).items():
        tb.image(f'VAE_reconstructions/{name}', step, grid)
    logger.info('[ep %d] tensorboard reconstructions of %d val images: %.2fs', step, len(inp_B3HW), time.time() - t0)


def validate_ckpt(ckpt: Dict) -> None:
    for k in ('epoch', 'iter', 'trainer', 'args'):
        if k not in ckpt:
            raise KeyError(f'no {k!r} entry: not a train_vae.py checkpoint')
    if 'vae_wo_ddp' not in ckpt['trainer']:
        raise KeyError("no trainer['vae_wo_ddp'] entry: not a train_vae.py checkpoint")


def load_weights(vae: VQVAE, path_or_name: str) -> str:
    """Start from a tokenizer state dict, a train_vae.py checkpoint or the published file."""
    state, path = load_tokenizer_state(path_or_name)
    try:
        vae.load_state_dict(state, strict=True)
    except CheckpointMismatchError as e:
        raise UserError(f'{path} does not fit the tokenizer that the flags build (--vocab_size={vae.vocab_size} '
                        f'--z_channels={vae.Cvae} --vae_ch={vae.ch} ...): pass the flags it was trained with. {e}') from None
    return path


def main(args: VAEArgs) -> Dict[str, float]:
    # ------------------------------------------------------------------ set up distributed, resume
    out_dir = args.local_out_dir_path
    device = setup_run(args, out_dir)
    rank = dist.get_rank()
    ckpt, start_ep, start_it = (None, 0, 0) if args.eval_only else resume(args, out_dir, (LAST, PREV), validate_ckpt)
    if args.eval_only and args.seed is None:
        args.seed = 0
    if ckpt is not None:
        check_resume_config(ckpt['args'], args, VAE_MODEL_KEYS, osp.join(out_dir, LAST))

    # ------------------------------------------------------------------ build data
    _, train_set, val_set, _ = build_dataset(args.data_path, final_reso=args.data_load_reso, hflip=args.hflip,
                                             mid_reso=args.mid_reso, seed=args.seed)
    sampler, ld_train, ld_val = build_loaders(args, train_set, val_set, start_ep, start_it, device)
    iters_train = len(sampler)

    # ------------------------------------------------------------------ build models
    torch.manual_seed(args.seed)
    vae_wo_ddp = build_vae(args, device)
    if args.eval_only:
        src = args.vae_ckpt or osp.join(out_dir, LAST)
        if not args.vae_ckpt and not osp.isfile(src):
            raise UserError(f'--eval_only needs weights: pass --vae_ckpt, or train first ({src} does not exist)')
        logger.info('evaluating %s', load_weights(vae_wo_ddp, src))
    elif ckpt is None and args.vae_ckpt:
        logger.info('fine-tuning from %s', load_weights(vae_wo_ddp, args.vae_ckpt))
    vae_wo_ddp.train()
    logger.info('tokenizer: %.2fM parameters, V=%d, Cvae=%d, ch=%d, scales %s', sum(p.numel() for p in vae_wo_ddp.parameters()) / 1e6,
                args.vocab_size, args.z_channels, args.vae_ch, args.patch_nums)

    lpips = None
    if args.lpips_weight > 0 and not args.eval_only:
        from models.lpips import LPIPS, LPIPSWeightsUnavailable
        try:
            lpips = LPIPS(vgg_path=args.lpips_vgg or None, lin_path=args.lpips_lin or None).to(device)
        except LPIPSWeightsUnavailable as e:
            raise UserError(str(e)) from None
    use_disc = args.disc_start >= 0 and not args.eval_only
    disc_wo_ddp = PatchDiscriminator(ch=args.disc_ch, n_layers=args.disc_layers).to(device) if use_disc else None

    if dist.initialized():
        ddp = lambda m: DDP(m, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)  # noqa: E731
        vae, disc = ddp(vae_wo_ddp), (ddp(disc_wo_ddp) if use_disc else None)
    else:
        vae, disc = vae_wo_ddp, disc_wo_ddp

    # ------------------------------------------------------------------ optimizers and trainer
    names, paras, groups = filter_params(vae_wo_ddp, nowd_keys=('embedding',))
    vae_opt = AmpOptimizer(device.type, args.fp16, build_adamw(groups, lr=args.lr, fused=args.afuse), names, paras,
                           grad_clip=args.clip, n_gradient_accumulation=args.ac)
    disc_opt = None
    if use_disc:
        d_names, d_paras, d_groups = filter_params(disc_wo_ddp, nowd_keys=())
        disc_opt = AmpOptimizer(device.type, args.fp16, build_adamw(d_groups, lr=args.disc_lr, fused=args.afuse, betas=(0.5, 0.9)),
                                d_names, d_paras, grad_clip=args.clip, n_gradient_accumulation=args.ac)
    trainer = VQVAETrainer(device, vae_wo_ddp, vae, vae_opt, disc_wo_ddp, disc, disc_opt, lpips, rec_loss=args.rec_loss,
                           rec_weight=args.rec_weight, vq_weight=args.vq_weight, lpips_weight=args.lpips_weight,
                           disc_start=args.disc_start if use_disc else -1, disc_weight=args.disc_weight, dead_threshold=args.dead_threshold)
    best = {'psnr': -math.inf}
    if ckpt is not None:
        trainer.load_state_dict(ckpt['trainer'])
        best.update(ckpt.get('best', {}))
        del ckpt

    log_txt = osp.join(out_dir, 'log.txt')
    if args.eval_only:
        m = trainer.evaluate(ld_val)
        logger.info('eval: PSNR %.2f dB, SSIM %.4f, L1 %.4f on %d images; codebook usage %s', m['psnr'], m['ssim'], m['l1'], m['images'],
                    ', '.join(f'{pn}: {m[f"usage_{pn}"]:.1f}%' for pn in args.patch_nums))
        append_log(log_txt, {'eval_only': True, 'vae_ckpt': args.vae_ckpt, **{k: round(v, 5) for k, v in m.items()}})
        return m

    # ------------------------------------------------------------------ train
    tb = TensorboardLogger(osp.join(out_dir, args.tb_name), enabled=dist.is_master())
    plan = plan_iterations(args.ep, args.wp, iters_train, start_ep, start_it)
    if plan is None:
        return {}
    max_it, wp_it, start_g_it, log_every = plan.max_it, plan.wp_it, plan.start_g_it, plan.log_every
    logger.info('training: %d epochs x %d iterations, global batch %d (%d per process), lr %.3g, losses: %s%s%s', args.ep, iters_train,
                args.bs, args.batch_size, args.lr, args.rec_loss, ' + lpips' if lpips is not None else '',
                f' + adversarial from iteration {args.disc_start}' if use_disc else '')
    guard = NonFiniteGuard(args.nonfinite_patience, osp.join(out_dir, LAST))

    def checkpoint_state(ep_next: int, it_next: int) -> Dict:
        return {'epoch': ep_next, 'iter': it_next, 'trainer': trainer.state_dict(), 'args': args.state_dict(), 'best': dict(best),
                'sampler': {'epoch': ep_next, 'iter': it_next, 'glb_batch_size': args.glb_batch_size, 'seed': args.same_seed_for_all_ranks},
                'rng': {'seed': args.seed, 'rule': 'torch.manual_seed(iteration_seed(seed, rank, g_it)) before each iteration'},
                'model_config': {'vqvae': vqvae_config_from_flags(args).to_dict()}}   # models/config.py

    writer = CheckpointWriter(out_dir, LAST, PREV, BEST, checkpoint_state, {'vae': vae_wo_ddp, **({'disc': disc_wo_ddp} if use_disc else {})},
                              iters_train, args.ckpt_every_min, args.ckpt_every_it, guard=guard)
    pbar = tqdm(total=max_it, initial=start_g_it, disable=not dist.is_master(), dynamic_ncols=True, desc='train_vae', unit='it')
    ld_iter = iter(ld_train)
    t_log, it_log = time.time(), start_g_it
    last_val: Dict[str, float] = {}
    positions = args.batch_size * args.patch_nums[-1] ** 2
    for ep in range(start_ep, args.ep):
        t_ep = time.time()
        ep_sum, n_logged = {}, 0
        for it in range(start_it if ep == start_ep else 0, iters_train):
            g_it = ep * iters_train + it
            inp_B3HW, _ = next(ld_iter)
            inp_B3HW = inp_B3HW.to(device, non_blocking=True)
            torch.manual_seed(iteration_seed(args.seed, rank, g_it))
            lr_wd_annealing(args.sche, vae_opt.optimizer, args.lr, args.wd, args.wd, g_it, wp_it, max_it, wp0=args.wp0, wpe=args.wpe)
            if disc_opt is not None:
                lr_wd_annealing(args.sche, disc_opt.optimizer, args.disc_lr, args.wd, args.wd, g_it, wp_it, max_it, wp0=args.wp0, wpe=args.wpe)
            stepping = (g_it + 1) % args.ac == 0
            out = trainer.train_step(g_it, stepping, inp_B3HW)
            guard.step(g_it, stepping, out)
            if stepping:
                if args.reinit_dead > 0 and (g_it + 1) % args.reinit_dead == 0:
                    n = trainer.reinit_dead_codes(inp_B3HW)
                    if n:
                        logger.info('iteration %d: re-initialised %d unused codebook entries', g_it, n)
            pbar.update(1)
            if (g_it + 1) % log_every == 0 or it == iters_train - 1 or g_it == start_g_it:
                scalars = {k: float(out[k]) for k in ('loss', 'rec_loss', 'vq_loss', 'lpips', 'g_loss', 'd_loss', 'd_weight') if k in out}
                usages = vae_wo_ddp.quantize.usages_percent(positions)
                now = time.time()
                imgs_per_sec = (g_it + 1 - it_log) * args.glb_batch_size / max(now - t_log, 1e-9)
                t_log, it_log = now, g_it + 1
                for k, v in scalars.items():
                    ep_sum[k] = ep_sum.get(k, 0.0) + v
                n_logged += 1
                tb.update('VAE_iter_loss', g_it, **scalars)
                tb.update('VAE_codebook_usage', g_it, **{f'scale_{pn}': u for pn, u in zip(args.patch_nums, usages)},
                          reinitialised=trainer.n_reinit)
                tb.update('VAE_opt', g_it, lr=vae_opt.optimizer.param_groups[0]['lr'], grad_norm=out['grad_norm'],
                          loss_scale_log2=out['scale_log2'], skipped_steps=guard.total)
                tb.update('VAE_speed', g_it, images_per_sec=imgs_per_sec)
                if dist.is_master():
                    pbar.set_postfix(ep=f'{ep + 1}/{args.ep}', rec=f'{scalars["rec_loss"]:.4f}', vq=f'{scalars["vq_loss"]:.4f}',
                                     use=f'{sum(usages) / len(usages):.0f}%', img_s=f'{imgs_per_sec:.1f}', refresh=False)
            if stepping and writer.due(g_it):
                writer.save(ep, it + 1)

        # ---------------------------------------------------------- end of epoch
        best_improved = False
        try:   # whatever fails in the bookkeeping below, the epoch's checkpoint is written first
            stats = {k: v / max(n_logged, 1) for k, v in ep_sum.items()}
            sec = time.time() - t_ep
            record = {'ep': ep + 1, 'it': (ep + 1) * iters_train, **{k: round(v, 5) for k, v in stats.items()},
                      'skipped_steps': guard.total, 'skipped_images': int(train_set.n_skipped.item()), 'reinitialised': trainer.n_reinit,
                      'sec_per_ep': round(sec, 2), 'remain_hours': round(sec * (args.ep - ep - 1) / 3600, 3)}
            if (ep + 1) % args.val_every_ep == 0 or ep + 1 == args.ep:
                last_val = trainer.evaluate(ld_val)
                guard.check_values(f'epoch {ep + 1} validation', last_val)
                best_improved = last_val['psnr'] > best['psnr']
                best['psnr'] = max(best['psnr'], last_val['psnr'])
                logger.info('[ep %d] val: PSNR %.2f dB, SSIM %.4f, L1 %.4f; codebook usage %s', ep + 1, last_val['psnr'], last_val['ssim'],
                            last_val['l1'], ', '.join(f'{pn}: {last_val[f"usage_{pn}"]:.1f}%' for pn in args.patch_nums))
                append_log(log_txt, {'ep': ep + 1, 'eval': True, **{k: round(v, 5) for k, v in last_val.items()}})
                tb.update('VAE_val', ep + 1, **{k: v for k, v in last_val.items() if k not in ('images', 'sec')})
                if dist.is_master():
                    log_reconstructions(tb, vae_wo_ddp, val_set, ep + 1, device, vae_opt.amp_ctx)
            logger.info('[ep %d/%d] rec %.4f vq %.4f | %.1fs/epoch', ep + 1, args.ep, stats.get('rec_loss', math.nan),
                        stats.get('vq_loss', math.nan), sec)
            append_log(log_txt, record)
            tb.flush()
        finally:
            stepped = ((ep + 1) * iters_train) % args.ac == 0
            writer.end_epoch(ep + 1, stepped, best_improved)
            if stepped and dist.is_local_master():
                export_weights(vae_wo_ddp, out_dir)

    pbar.close()
    tb.close()
    if dist.is_local_master():
        export_weights(vae_wo_ddp, out_dir)
    logger.info('finished %d epochs; tokenizer weights for train.py --vae_ckpt: %s (and %s, for one more release)', args.ep,
                osp.join(out_dir, EXPORT_SAFETENSORS), EXPORT)
    guard.finish()
    return {**stats, **last_val}


if __name__ == '__main__':
    run_main(lambda: main(parse_vae_args()))
