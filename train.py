"""Train VAR on an ImageNet-style folder (train/ and val/ class subfolders) or on pre-extracted tokens.

    torchrun --nproc_per_node=8 train.py --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 --data_path=/path/to/imagenet

torchrun's own flags cover several machines; a plain `python train.py ...` runs as one process.
Rerunning the same command resumes from local_output/ar-ckpt-last.pth, mid-epoch included.
"""
import logging
import math
import os.path as osp
import random
import time
from typing import Dict

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import dist
from models import VQVAE, build_var, build_vqvae
from models.pretrained import hub_push_problem
from trainer import VARTrainer
from utils.amp_opt import AmpOptimizer, build_adamw
from utils.arg_util import MODEL_KEYS, Args, FlagError, parse_args, var_config_from_flags, vqvae_config_from_flags
from utils.cli import run_main
from utils.data import build_dataset
from utils.lr_control import filter_params, lr_wd_annealing
from utils.progressive import ProgressiveSchedule
from utils.reference_ckpt import complete_reference_args, is_reference_ckpt
from utils.run import (CheckpointWriter, NonFiniteGuard, append_log, build_loaders, check_resume_config, iteration_seed, resume,
                       plan_iterations, setup_run)
from utils.tb import TensorboardLogger
from utils.weights import load_tokenizer_state
from utils.vis import ema_weights, fixed_classes, sample_grid, vis_epochs_due

logger = logging.getLogger('train')

LAST, PREV, BEST = 'ar-ckpt-last.pth', 'ar-ckpt-prev.pth', 'ar-ckpt-best.pth'
PRETRAINED = 'pretrained'   # save_pretrained's folder of the final model


def compile_model(m: torch.nn.Module, fast: int) -> torch.nn.Module:
    if fast == 0:
        return m
    mode = {1: 'reduce-overhead', 2: 'max-autotune', 3: 'default'}.get(fast)
    if mode is None:
        raise FlagError(f'--tfast/--vfast={fast}: use 0 (off), 1 (reduce-overhead), 2 (max-autotune) or 3 (default)')
    logger.info('torch.compile(%s, mode=%s)', type(m).__name__, mode)
    return torch.compile(m, mode=mode)


def load_vae(vae: VQVAE, ckpt_path: str) -> str:
    """Load tokenizer weights: a local file (a state dict or a train_vae.py checkpoint), else the published file from the Hub."""
    state, path = load_tokenizer_state(ckpt_path)
    vae.load_state_dict(state, strict=True)
    return path


def validate_ckpt(ckpt: Dict) -> None:
    """Check the layout (this project's or the reference's train.py); a reference checkpoint's args are completed, and the log says how."""
    for k in ('epoch', 'iter', 'trainer', 'args'):
        if k not in ckpt:
            raise KeyError(f'no {k!r} entry: not a train.py checkpoint')
    for k in ('var_wo_ddp', 'var_opt'):
        if k not in ckpt['trainer']:
            raise KeyError(f'no trainer[{k!r}] entry: not a train.py checkpoint')
    if is_reference_ckpt(ckpt):
        notes = complete_reference_args(ckpt)
        logger.info('a checkpoint of the reference\'s train.py, whose args record neither the class count, nor the tokenizer\'s shape, '
                    'nor the number of processes; inferred: %s', '; '.join(notes))


def data_source(args: Args) -> str:
    """'tokens' or 'images'; says which when both --tokens_path and a --data_path are given."""
    if not args.tokens_path:
        return 'images'
    if args.data_path != Args.data_path:
        logger.warning('both --tokens_path=%s and --data_path=%s are given: training from the token maps in --tokens_path; '
                       '--data_path is not read', args.tokens_path, args.data_path)
    return 'tokens'


def build_trainer(args: Args, device: torch.device, vae_local: VQVAE, var_wo_ddp: torch.nn.Module, var: torch.nn.Module,
                  iters_train: int = 0) -> VARTrainer:
    """AdamW over the reference's parameter groups, the AMP wrapper and the trainer, as train.py uses them
    (with the progressive schedule of --pg, whose iteration counts need iters_train, the iterations of an epoch)."""
    names, paras, para_groups = filter_params(var_wo_ddp)
    optimizer = build_adamw(para_groups, lr=args.tlr, fused=args.afuse)
    var_opt = AmpOptimizer(device.type, args.fp16, optimizer, names, paras, grad_clip=args.tclip, n_gradient_accumulation=args.ac)
    return VARTrainer(device=device, patch_nums=args.patch_nums, resos=args.resos, vae_local=vae_local, var_wo_ddp=var_wo_ddp,
                      var=var, var_opt=var_opt, label_smooth=args.ls, ema_decay=args.ema,
                      progressive=ProgressiveSchedule.from_args(args, iters_train))


def draw_sample_grid(trainer: VARTrainer, args: Args, tb: TensorboardLogger, ep_done: int):
    """Samples of fixed classes and seeds from the EMA weights (the trained ones without --ema), to tensorboard; the grid."""
    t0 = time.time()
    with ema_weights(trainer.var_wo_ddp, trainer.ema) as var:
        try:   # a picture for tensorboard must not take the run (and its end-of-epoch checkpoint) down
            grid = sample_grid(var, fixed_classes(args.num_classes), seed=args.seed, amp_ctx=trainer.var_opt.amp_ctx)
        except RuntimeError as e:   # diverged weights: "probability tensor contains either inf, nan or element < 0"
            logger.warning('[ep %d] no tensorboard sample grid: sampling failed (%s); the weights may have diverged',
                           ep_done, str(e).splitlines()[0])
            return None
    tb.image('AR_samples/fixed_classes_and_seeds', ep_done, grid)
    logger.info('[ep %d] tensorboard sample grid (%s weights): %.2fs', ep_done, 'EMA' if trainer.ema else 'trained', time.time() - t0)
    return grid


def export_final(trainer: VARTrainer, args: Args, out_dir: str, metrics: Dict[str, float], grid) -> None:
    """save_pretrained into out_dir/pretrained and/or push_to_hub the final model (its EMA weights with --ema), with a model card."""
    card = dict(command=f'train.py {args.cmd}', dataset=args.tokens_path or args.data_path, epochs=args.ep, metrics=dict(metrics),
                weights=f'EMA of the trained weights (decay {args.ema:g})' if trainer.ema else 'the trained weights (no EMA)',
                sample_grid=grid)
    with ema_weights(trainer.var_wo_ddp, trainer.ema) as var:
        if args.save_pretrained:
            folder = osp.join(out_dir, PRETRAINED)
            var.save_pretrained(folder, model_card_kwargs=card)
            logger.info('final model saved with save_pretrained: %s (VAR.from_pretrained or models.load_pretrained reads it)', folder)
        if args.push_to_hub:
            url = var.push_to_hub(args.push_to_hub, model_card_kwargs=card, commit_message=f'train.py: {args.ep} epochs')
            logger.info('final model pushed to the Hugging Face repo %s: %s', args.push_to_hub, url)


def main(args: Args) -> Dict[str, float]:
    # ------------------------------------------------------------------ set up distributed, resume
    out_dir = args.local_out_dir_path
    device = setup_run(args, out_dir)
    rank = dist.get_rank()
    if args.push_to_hub:   # before anything expensive: a run does not find out at its end that it cannot push
        problem = dist.broadcast_object(hub_push_problem(args.push_to_hub) if dist.is_master() else None)
        if problem:
            raise FlagError(f'--push_to_hub={args.push_to_hub}: {problem}')
    token_batches = data_source(args) == 'tokens'
    ckpt, start_ep, start_it = resume(args, out_dir, (LAST, PREV), validate_ckpt)
    if args.seed is None:   # a reference checkpoint made without --seed
        args.seed = dist.broadcast_object(random.SystemRandom().randrange(2 ** 31))
        logger.info('seed %d drawn for the rest of this run', args.seed)
    if ckpt is not None and args.num_classes == 0:
        args.num_classes = ckpt['args']['num_classes']

    # ------------------------------------------------------------------ build data
    if token_batches:
        from utils.token_data import build_token_datasets
        num_folder_classes, train_set, val_set, meta = build_token_datasets(args.tokens_path, args.patch_nums, hflip=args.hflip, seed=args.seed)
    else:
        num_folder_classes, train_set, val_set, _ = build_dataset(args.data_path, final_reso=args.data_load_reso, hflip=args.hflip,
                                                                 mid_reso=args.mid_reso, seed=args.seed)
    if args.num_classes == 0:
        args.num_classes = num_folder_classes
    elif args.num_classes < num_folder_classes:
        raise FlagError(f'--num_classes={args.num_classes} but the data has {num_folder_classes} classes')
    if ckpt is not None:
        check_resume_config(ckpt['args'], args, MODEL_KEYS, osp.join(out_dir, LAST))
    sampler, ld_train, ld_val = build_loaders(args, train_set, val_set, start_ep, start_it, device)
    iters_train = len(sampler)

    # ------------------------------------------------------------------ build models
    torch.manual_seed(args.seed)   # the same initial weights on every process and in every rerun
    vae_local = build_vqvae(vqvae_config_from_flags(args), device)
    var_wo_ddp = build_var(var_config_from_flags(args), vae_local, flash_if_available=args.fuse, fused_if_available=args.fuse,
                           init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini)
    logger.info('tokenizer weights: %s', load_vae(vae_local, args.vae_ckpt))
    if token_batches:
        from utils.token_data import TokensError, tokenizer_fingerprint
        if meta['tokenizer'] != tokenizer_fingerprint(vae_local.state_dict()):
            raise TokensError(f'the tokens in {args.tokens_path} were extracted with another tokenizer than --vae_ckpt={args.vae_ckpt}')
        logger.info('training from the token maps in %s (%d images and their flips; no other augmentation)', args.tokens_path, len(train_set))
    var_wo_ddp.grad_ckpt = args.grad_ckpt
    logger.info('VAR d%d: %.2fM parameters; tokenizer: %.2fM', args.depth, sum(p.numel() for p in var_wo_ddp.parameters()) / 1e6,
                sum(p.numel() for p in vae_local.parameters()) / 1e6)
    vae_local = compile_model(vae_local, args.vfast)
    var_compiled = compile_model(var_wo_ddp, args.tfast)
    if dist.initialized():
        var = DDP(var_compiled, device_ids=[device.index] if device.type == 'cuda' else None,
                  find_unused_parameters=False, broadcast_buffers=False)
    else:
        var = var_compiled

    # ------------------------------------------------------------------ build optimizer and trainer
    trainer = build_trainer(args, device, vae_local, var_wo_ddp, var, iters_train)
    optimizer = trainer.var_opt.optimizer
    best = {'vL_tail': math.inf, 'vL_mean': math.inf, 'vacc_tail': -1.0, 'vacc_mean': -1.0}
    if ckpt is not None:
        trainer.load_state_dict(ckpt['trainer'], strict=True, skip_vae=True)
        best.update(ckpt.get('best', {}))
        del ckpt

    # ------------------------------------------------------------------ train
    tb = TensorboardLogger(osp.join(out_dir, args.tb_name), enabled=dist.is_master())
    log_txt = osp.join(out_dir, 'log.txt')
    plan = plan_iterations(args.ep, args.wp, iters_train, start_ep, start_it)
    if plan is None:
        return {}
    max_it, wp_it, start_g_it, log_every = plan.max_it, plan.wp_it, plan.start_g_it, plan.log_every

    logger.info('training: %d epochs x %d iterations, global batch %d (%d per process, %d accumulation steps), lr %.3g',
                args.ep, iters_train, args.bs, args.batch_size, args.ac, args.tlr)
    pbar = tqdm(total=max_it, initial=start_g_it, disable=not dist.is_master(), dynamic_ncols=True, desc='train', unit='it')
    ld_iter = iter(ld_train)
    guard = NonFiniteGuard(args.nonfinite_patience, osp.join(out_dir, LAST))
    last_val = {}
    grid = None

    def checkpoint_state(ep_next: int, it_next: int) -> Dict:
        return {'epoch': ep_next, 'iter': it_next, 'trainer': trainer.state_dict(), 'args': args.state_dict(), 'best': dict(best),
                'model_config': args.model_config(),   # the tokenizer's and the VAR's configs (models/config.py)
                # where the data stream stands, and how every random draw after it is seeded
                'sampler': {'epoch': ep_next, 'iter': it_next, 'glb_batch_size': args.glb_batch_size, 'seed': args.same_seed_for_all_ranks},
                'rng': {'seed': args.seed, 'rule': 'torch.manual_seed(iteration_seed(seed, rank, g_it)) before each iteration; '
                                                   'augmentation seeded by (seed, epoch, index)'}}

    writer = CheckpointWriter(out_dir, LAST, PREV, BEST, checkpoint_state, {'var': var_wo_ddp}, iters_train,
                              args.ckpt_every_min, args.ckpt_every_it, guard=guard)

    t_log = time.time()
    it_log = start_g_it
    for ep in range(start_ep, args.ep):
        ep_stats, n_logged = {}, 0
        t_ep = time.time()
        for it in range(start_it if ep == start_ep else 0, iters_train):
            g_it = ep * iters_train + it
            batch, label_B = next(ld_iter)
            label_B = label_B.to(device, non_blocking=True)
            torch.manual_seed(iteration_seed(args.seed, rank, g_it))
            min_tlr, max_tlr, min_twd, max_twd = lr_wd_annealing(args.sche, optimizer, args.tlr, args.twd, args.twde, g_it, wp_it, max_it,
                                                                 wp0=args.wp0, wpe=args.wpe)
            stepping = (g_it + 1) % args.ac == 0
            if token_batches:
                gt_BL = batch.to(device, non_blocking=True)
                gt_idx_Bl = [gt_BL[:, bg:ed] for bg, ed in trainer.begin_ends]
                out = trainer.train_step(g_it, stepping, label_B, gt_idx_Bl=gt_idx_Bl)
            else:
                out = trainer.train_step(g_it, stepping, label_B, inp_B3HW=batch.to(device, non_blocking=True))

            guard.step(g_it, stepping, out)

            pbar.update(1)
            if (g_it + 1) % log_every == 0 or it == iters_train - 1 or g_it == start_g_it:
                m = trainer.scale_metrics(out['logits_BLV'], out['gt_BL'])
                now = time.time()
                imgs_per_sec = (g_it + 1 - it_log) * args.glb_batch_size / max(now - t_log, 1e-9)
                t_log, it_log = now, g_it + 1
                for k in ('L_mean', 'L_tail', 'acc_mean', 'acc_tail'):
                    if k in m:
                        ep_stats[k] = ep_stats.get(k, 0.0) + m[k]
                n_logged += 1
                if dist.is_master():
                    tb.update('AR_iter_loss', g_it, **m)
                    tb.update('AR_opt', g_it, lr_max=max_tlr, lr_min=min_tlr, wd_max=max_twd, wd_min=min_twd,
                              grad_norm=out['grad_norm'], loss_scale_log2=out['scale_log2'], skipped_steps=guard.total)
                    tb.update('AR_speed', g_it, images_per_sec=imgs_per_sec)
                    tb.update('AR_iter_schedule', g_it, prog_si=out['prog_si'], prog_wp=out['prog_wp'])
                    pbar.set_postfix(ep=f'{ep + 1}/{args.ep}', loss=f'{m["L_mean"]:.3f}', acc=f'{m["acc_mean"]:.1f}',
                                     lr=f'{max_tlr:.2e}', img_s=f'{imgs_per_sec:.1f}', refresh=False)

            if stepping and writer.due(g_it):
                writer.save(ep, it + 1)

        # ---------------------------------------------------------- end of epoch
        best_improved = False
        try:   # whatever fails in the bookkeeping below, the epoch's checkpoint is written
            stats = {k: v / max(n_logged, 1) for k, v in ep_stats.items()}
            n_skipped_imgs = int(train_set.n_skipped.item()) if hasattr(train_set, 'n_skipped') else 0
            sec = time.time() - t_ep
            remain = sec * (args.ep - ep - 1)
            record = {'ep': ep + 1, 'it': (ep + 1) * iters_train, **{k: round(v, 5) for k, v in stats.items()},
                      'tlr': max_tlr, 'twd': max_twd, 'skipped_steps': guard.total, 'skipped_images': n_skipped_imgs,
                      'sec_per_ep': round(sec, 2), 'remain_hours': round(remain / 3600, 3)}
            if n_skipped_imgs:
                logger.warning('%d unreadable images were skipped so far', n_skipped_imgs)
            is_val = (ep + 1) % args.val_every_ep == 0 or ep + 1 == args.ep
            if is_val:
                vL_mean, vL_tail, vacc_mean, vacc_tail, tot, cost = trainer.eval_ep(ld_val, token_batches=token_batches)
                best_improved = vL_tail < best['vL_tail']
                best.update(vL_tail=min(best['vL_tail'], vL_tail), vL_mean=min(best['vL_mean'], vL_mean),
                            vacc_tail=max(best['vacc_tail'], vacc_tail), vacc_mean=max(best['vacc_mean'], vacc_mean))
                last_val = dict(vL_mean=vL_mean, vL_tail=vL_tail, vacc_mean=vacc_mean, vacc_tail=vacc_tail)
                guard.check_values(f'epoch {ep + 1} validation', last_val)
                logger.info('[ep %d] val (%d images, %.1fs): loss %.4f, last scale %.4f, acc %.2f%%, last scale %.2f%%',
                            ep + 1, tot, cost, vL_mean, vL_tail, vacc_mean, vacc_tail)
                append_log(log_txt, {'ep': ep + 1, 'eval': True, **{k: round(v, 5) for k, v in last_val.items()}, 'val_images': tot,
                                     'best_vL_tail': round(best['vL_tail'], 5)})
                tb.update('AR_ep_loss', ep + 1, **last_val)
            logger.info('[ep %d/%d] loss %.4f acc %.2f%% | %.1fs/epoch, %.2f h left', ep + 1, args.ep, stats.get('L_mean', float('nan')),
                        stats.get('acc_mean', float('nan')), sec, remain / 3600)
            append_log(log_txt, record)
            tb.update('AR_ep_loss', ep + 1, **stats)
            tb.update('AR_z_burnout', ep + 1, rest_hours=remain / 3600)
            if dist.is_master() and vis_epochs_due(ep + 1, args.ep, args.vis_every_ep):
                grid = draw_sample_grid(trainer, args, tb, ep + 1)
            tb.flush()
        finally:
            writer.end_epoch(ep + 1, ((ep + 1) * iters_train) % args.ac == 0, best_improved)

    pbar.close()
    tb.close()
    logger.info('finished %d epochs; checkpoints in %s', args.ep, out_dir)
    guard.finish()
    if dist.is_master() and (args.save_pretrained or args.push_to_hub):
        export_final(trainer, args, out_dir, {**stats, **last_val}, grid)
    return {**stats, **last_val}


if __name__ == '__main__':
    run_main(lambda: main(parse_args()))
