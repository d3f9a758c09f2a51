"""Train the multi-scale VQVAE tokenizer from scratch, or fine-tune the published one (--vae_ckpt).

    torchrun --nproc_per_node=8 train_vae.py --data_path=/path/to/imagenet --bs=256 --ep=40 --fp16=2
    python train_vae.py --data_path=... --eval_only=1 --vae_ckpt=vae_ch160v4096z32.pth     # PSNR, SSIM, codebook usage
    torchrun --nproc_per_node=8 train_vae.py --data_path=... --eval_only=1 --vae_ckpt=... --recon_npz=recon/vae.npz   # for rFID

Same data folders, mixed precision, resume-at-any-moment, atomic checkpoints, tensorboard and
progress bar as train.py. The tokenizer's weights are also exported as `vae.safetensors` (and, for one
more release, `vae.pth`), a plain state dict that loads strictly into VQVAE / build_vae_var and works as
`train.py --vae_ckpt`. Every validation puts input/reconstruction pairs in tensorboard. With --eval_only, --recon_npz
writes the val images' reconstructions and the centre-cropped originals as two .npz files for evaluate.py (rFID), the
same for any number of processes, each with a manifest of what they depend on (docs/fid.md).
"""
import hashlib
import logging
import os
import os.path as osp
import time
from typing import Dict, Optional, Tuple

import torch

import dist
from models import VQVAE, build_vqvae
from models.state_dict import CheckpointMismatchError
from models.discriminator import PatchDiscriminator
from utils.amp_opt import AmpOptimizer, build_adamw
from utils.arg_util import VAE_MODEL_KEYS, FlagError, VAEArgs, parse_vae_args, vqvae_config_from_flags
from utils.ckpt import remove_stale_temps
from utils.cli import UserError, run_main
from utils.cpu_speed import speed_up
from utils.data import build_dataset
from utils.engine import CheckpointNames, run_training
from utils.lr_control import filter_params
from utils.model_loading import state_fingerprint
from utils.parallel import checkpoint_store, wrap_for_training
from utils.run import append_log, build_loaders, check_resume_config, resume, setup_run
from vae_trainer import ReconstructionNpz, VQVAETask, VQVAETrainer, ref_npz_path
from utils.weights import load_tokenizer_state

logger = logging.getLogger('train_vae')

LAST, PREV, BEST = 'vae-ckpt-last.pth', 'vae-ckpt-prev.pth', 'vae-ckpt-best.pth'
RECON_FORMAT = 'var-tokenizer-reconstructions/1'   # arr_0[i]: val image i (sorted class folders, sorted files), centre crop


def build_vae(args: VAEArgs, device: torch.device) -> VQVAE:
    vae = build_vqvae(vqvae_config_from_flags(args), device, test_mode=False, beta=args.beta)
    speed_up(vae)   # cpu_kernels, before any wrapping
    return vae


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


def check_recon_flags(args: VAEArgs) -> None:
    """--recon_npz: with --eval_only, a path ending in .npz in a folder (or where one can be made); checked before any work."""
    if not args.recon_npz:
        return
    if not args.eval_only:
        raise FlagError(f'--recon_npz={args.recon_npz} needs --eval_only=1: the reconstructions are of the weights that --eval_only '
                        f'evaluates (--vae_ckpt), not of a training run; add --eval_only=1, or leave out --recon_npz')
    if not args.recon_npz.endswith('.npz'):
        raise FlagError(f'--recon_npz={args.recon_npz} must end in .npz (the originals go beside it as <stem>_ref.npz)')
    folder = osp.dirname(osp.abspath(args.recon_npz))
    parent = folder
    while not osp.exists(parent):
        parent = osp.dirname(parent)
    if not osp.isdir(parent) or not os.access(parent, os.W_OK):
        raise FlagError(f'--recon_npz={args.recon_npz}: cannot write into {parent} (not a writable folder); choose another path')


def build_models(args: VAEArgs, device: torch.device, out_dir: str, resuming: bool
                 ) -> Tuple[VQVAETrainer, Optional[Tuple[str, str]]]:
    """The tokenizer (with --eval_only or --vae_ckpt's weights), the optional LPIPS and discriminator, their optimizers; the trainer,
    and with --eval_only the path and sha256 (utils.model_loading.state_fingerprint, taken before any sharding) of the weights."""
    torch.manual_seed(args.seed)
    vae_wo_ddp = build_vae(args, device)
    evaluated = None
    if args.eval_only:
        src = args.vae_ckpt or osp.join(out_dir, LAST)
        if not args.vae_ckpt and not osp.isfile(src):
            raise UserError(f'--eval_only needs weights: pass --vae_ckpt, or train first ({src} does not exist)')
        evaluated = load_weights(vae_wo_ddp, src), state_fingerprint(vae_wo_ddp)
        logger.info('evaluating %s (state dict sha256 %s)', *evaluated)
    elif not resuming and args.vae_ckpt:
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

    # DDP, or (--fsdp=1, no discriminator) the tokenizer sharded in place; its validation methods gather the weights as forward does
    vae = wrap_for_training(vae_wo_ddp, args, device, forward_methods=('img_to_idxBl', 'idxBl_to_img', 'img_to_reconstructed_img'))
    disc = wrap_for_training(disc_wo_ddp, args, device) if use_disc else None

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
    return trainer, evaluated


def recon_manifests(args: VAEArgs, val_set, device: torch.device, weights_path: str, weights_sha256: str) -> Tuple[Dict, Dict]:
    """What the --recon_npz files depend on (stored in each as manifest.json; evaluate.py prints it): the val images (folder,
    count, a sha256 of their file names in order, resize and crop) and, for the reconstructions, the tokenizer (build
    arguments, sha256 of its state dict as sample.py records it, precision)."""
    data = osp.abspath(args.data_path)
    names = '\n'.join(osp.relpath(path, data) for path, _ in val_set.samples)
    images = dict(format=RECON_FORMAT, data_path=data, split='val', images=len(val_set.samples),
                  files_sha256=hashlib.sha256(names.encode()).hexdigest(), image_size=val_set.final_reso, mid_reso=args.mid_reso,
                  resize=f'short side to {val_set.mid_reso} px (Lanczos)', crop='centre')
    info = dict(processes=dist.get_world_size(), torch=torch.__version__, created=time.strftime('%Y-%m-%d %H:%M:%S'), cmd=args.cmd)
    rec = dict(images, content='reconstructions from all scales', vae_sha256=weights_sha256,
               model=vqvae_config_from_flags(args).to_dict(), fp16=args.fp16, device=device.type)
    if device.type == 'cuda':
        rec['tf32'] = args.tf32
    return (dict(pixels=rec, info=dict(info, vae_weights=weights_path, originals=ref_npz_path(args.recon_npz))),
            dict(pixels=dict(images, content='originals'), info=dict(info, reconstructions=args.recon_npz)))


def evaluate_only(args: VAEArgs, trainer: VQVAETrainer, val_set, ld_val, out_dir: str, weights: Tuple[str, str]) -> Dict[str, float]:
    """--eval_only: PSNR, SSIM, L1 and codebook usage of the weights, logged and appended to log.txt; with --recon_npz the
    reconstructions and originals written too (the same pass, over ReconstructionNpz's blocks)."""
    recon = None
    if args.recon_npz:
        manifests = recon_manifests(args, val_set, trainer.device, *weights)
        if dist.is_master():
            folder = osp.dirname(osp.abspath(args.recon_npz))
            os.makedirs(folder, exist_ok=True)
            removed = remove_stale_temps(folder, bases=[osp.basename(p) for p in (args.recon_npz, ref_npz_path(args.recon_npz))])[0]
            if removed:
                logger.info('removed %d temporary file(s) of a killed run: %s', len(removed), ', '.join(removed))
        recon = ReconstructionNpz(args.recon_npz, val_set, ld_val.batch_size, manifests)
        ld_val = recon.loader(args.workers, ld_val.pin_memory)
    try:
        m = trainer.evaluate(ld_val, recon)
    except BaseException:
        if recon is not None:
            recon.discard()
        raise
    logger.info('eval: PSNR %.2f dB, SSIM %.4f, L1 %.4f on %d images; codebook usage %s', m['psnr'], m['ssim'], m['l1'], m['images'],
                ', '.join(f'{pn}: {m[f"usage_{pn}"]:.1f}%' for pn in args.patch_nums))
    record = {'eval_only': True, 'vae_ckpt': args.vae_ckpt, **{k: round(v, 5) for k, v in m.items()}}
    if recon is not None:
        record.update(recon_npz=args.recon_npz, ref_npz=ref_npz_path(args.recon_npz))
        logger.info('reconstructions of the %d val images: %s; the originals: %s (arr_0 (N, %d, %d, 3) uint8 each; rFID: '
                    'python evaluate.py %s %s)', m['images'], args.recon_npz, record['ref_npz'], val_set.final_reso,
                    val_set.final_reso, record['ref_npz'], args.recon_npz)
    append_log(osp.join(out_dir, 'log.txt'), record)
    return m


def main(args: VAEArgs) -> Dict[str, float]:
    # ------------------------------------------------------------------ set up distributed, resume
    check_recon_flags(args)
    out_dir = args.local_out_dir_path
    device = setup_run(args, out_dir)
    ckpt, start_ep, start_it = (None, 0, 0) if args.eval_only else resume(args, out_dir, (LAST, PREV), validate_ckpt)
    if args.eval_only and args.seed is None:
        args.seed = 0
    if ckpt is not None:
        check_resume_config(ckpt['args'], args, VAE_MODEL_KEYS, osp.join(out_dir, LAST))

    # ------------------------------------------------------------------ build data
    _, train_set, val_set, class_names = build_dataset(args.data_path, final_reso=args.data_load_reso, hflip=args.hflip,
                                                       mid_reso=args.mid_reso, seed=args.seed)
    sampler, ld_train, ld_val = build_loaders(args, train_set, val_set, start_ep, start_it, device)

    # ------------------------------------------------------------------ build models, optimizers and trainer
    trainer, evaluated = build_models(args, device, out_dir, resuming=ckpt is not None)
    if args.eval_only:
        return evaluate_only(args, trainer, val_set, ld_val, out_dir, evaluated)
    task = VQVAETask(trainer, args, out_dir, val_set, ld_val)
    task.class_names = class_names   # recorded in every checkpoint
    if ckpt is not None:   # with --fsdp=1 the tensors are read now, into the sharded layout (another process count reshards)
        optimizers = [o.optimizer for o in (trainer.vae_opt, trainer.disc_opt) if o is not None]
        checkpoint_store(args).restore(task, ckpt, optimizers)
        del ckpt

    # ------------------------------------------------------------------ train (utils/engine.py)
    return run_training(args, task, out_dir, CheckpointNames(LAST, PREV, BEST), train_set, ld_train, len(sampler), start_ep, start_it)


if __name__ == '__main__':
    run_main(lambda: main(parse_vae_args()))
