"""Train VAR on an ImageNet-style folder (train/ and val/ class subfolders) or on pre-extracted tokens.

    torchrun --nproc_per_node=8 train.py --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1 --data_path=/path/to/imagenet

torchrun's own flags cover several machines; a plain `python train.py ...` runs as one process.
Rerunning the same command resumes from local_output/ar-ckpt-last.pth, mid-epoch included.
"""
import logging
import os.path as osp
import random
from typing import Dict, List, Optional

import torch

import dist
from models import VQVAE, build_var, build_vqvae
from models.pretrained import hub_push_problem
from trainer import VARTask, VARTrainer
from utils.amp_opt import AmpOptimizer, build_adamw
from utils.arg_util import MODEL_KEYS, Args, FlagError, parse_args, var_config_from_flags, vqvae_config_from_flags
from utils.class_names import check_same_classes
from utils.cli import run_main
from utils.compile import compile_blocks
from utils.cpu_speed import speed_up
from utils.data import build_dataset
from utils.engine import CheckpointNames, run_training
from utils.init_from import InitSource, load_source_weights, start_from
from utils.lr_control import filter_params
from utils.model_loading import given_flags
from utils.parallel import checkpoint_store, wrap_for_training
from utils.progressive import ProgressiveSchedule
from utils.reference_ckpt import complete_reference_args, is_reference_ckpt
from utils.run import build_loaders, check_resume_config, resume, setup_run
from utils.weights import load_tokenizer_state

logger = logging.getLogger('train')

LAST, PREV, BEST = 'ar-ckpt-last.pth', 'ar-ckpt-prev.pth', 'ar-ckpt-best.pth'


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


def check_push_to_hub(args: Args) -> None:
    """Before anything expensive: a run does not find out at its end that it cannot push."""
    if args.push_to_hub:
        problem = dist.broadcast_object(hub_push_problem(args.push_to_hub) if dist.is_master() else None)
        if problem:
            raise FlagError(f'--push_to_hub={args.push_to_hub}: {problem}')


def build_data(args: Args, token_batches: bool):
    """(train set, val set, token metadata or None, class names: id = position); sets --num_classes=0 to the data's class count."""
    if token_batches:
        from utils.token_data import build_token_datasets
        num_folder_classes, train_set, val_set, meta = build_token_datasets(args.tokens_path, args.patch_nums, hflip=args.hflip, seed=args.seed)
        class_names = list(meta['classes'])
    else:
        num_folder_classes, train_set, val_set, class_names = build_dataset(args.data_path, final_reso=args.data_load_reso,
                                                                           hflip=args.hflip, mid_reso=args.mid_reso, seed=args.seed)
        meta = None
    if args.num_classes == 0:
        args.num_classes = num_folder_classes
    elif args.num_classes < num_folder_classes:
        raise FlagError(f'--num_classes={args.num_classes} but the data has {num_folder_classes} classes')
    return train_set, val_set, meta, class_names


def build_models(args: Args, device: torch.device, meta: Optional[Dict], n_train: int, init: Optional[InitSource] = None,
                 class_names: Optional[List[str]] = None):
    """(tokenizer, VAR, VAR as trained: compiled and/or in DDP, or sharded in place with --fsdp=1), the same initial weights on
    every process and in every rerun; with `init` (--init_from), its weights (the class embedding following class_names)."""
    torch.manual_seed(args.seed)
    vae_local = build_vqvae(vqvae_config_from_flags(args), device)
    var_wo_ddp = build_var(var_config_from_flags(args), vae_local, flash_if_available=args.fuse, fused_if_available=args.fuse,
                           init_adaln=args.aln, init_adaln_gamma=args.alng, init_head=args.hd, init_std=args.ini)
    speed_up(vae_local, var_wo_ddp)   # cpu_kernels, before any compiling or wrapping
    if init is not None:
        load_source_weights(init, vae_local, var_wo_ddp, class_names)
    if init is not None and init.vae_state is not None:   # the tokenizer of --init_from's source
        vae_from = init.vae_what
    else:
        vae_from = f'--vae_ckpt={args.vae_ckpt} ({load_vae(vae_local, args.vae_ckpt)})'
    logger.info('tokenizer weights: %s', vae_from)
    if meta is not None:
        from utils.token_data import TokensError, tokenizer_fingerprint
        if meta['tokenizer'] != tokenizer_fingerprint(vae_local.state_dict()):
            raise TokensError(f'the tokens in {args.tokens_path} were extracted with another tokenizer than {vae_from}')
        crops = meta.get('crops', 1)
        logger.info('training from the token maps in %s (%d images: %s and their flips; no other augmentation)', args.tokens_path, n_train,
                    'the centre crop' if crops == 1 else f'{crops} crops each')
    var_wo_ddp.grad_ckpt = args.grad_ckpt
    logger.info('VAR d%d: %.2fM parameters; tokenizer: %.2fM', args.depth, sum(p.numel() for p in var_wo_ddp.parameters()) / 1e6,
                sum(p.numel() for p in vae_local.parameters()) / 1e6)
    vae_local = compile_model(vae_local, args.vfast)   # the frozen tokenizer: replicated, never sharded
    # --compile_blocks: each block compiled in place (var is var_wo_ddp, the same state dict); --tfast: a compiled wrapper
    var = compile_blocks(var_wo_ddp) if args.compile_blocks else compile_model(var_wo_ddp, args.tfast)
    # DDP, or (--fsdp=1) each block and then the root sharded in place; sampling gathers the weights as forward does
    var = wrap_for_training(var, args, device, blocks=var_wo_ddp.blocks, forward_methods=('autoregressive_infer_cfg',))
    return vae_local, var_wo_ddp, var


def main(args: Args) -> Dict[str, float]:
    # ------------------------------------------------------------------ set up distributed, resume
    out_dir = args.local_out_dir_path
    device = setup_run(args, out_dir)
    check_push_to_hub(args)
    token_batches = data_source(args) == 'tokens'
    ckpt, start_ep, start_it = resume(args, out_dir, (LAST, PREV), validate_ckpt)
    if args.seed is None:   # a reference checkpoint made without --seed
        args.seed = dist.broadcast_object(random.SystemRandom().randrange(2 ** 31))
        logger.info('seed %d drawn for the rest of this run', args.seed)
    if ckpt is not None and args.num_classes == 0:
        args.num_classes = ckpt['args']['num_classes']
    # --init_from: the weights' shape checked against the flags and read now; a resumable checkpoint wins over it
    init = start_from(args, ckpt, given_flags(args.cmd.split()), out_dir)

    # ------------------------------------------------------------------ build data
    train_set, val_set, meta, class_names = build_data(args, token_batches)
    if ckpt is not None:
        check_resume_config(ckpt['args'], args, MODEL_KEYS, osp.join(out_dir, LAST))
        check_same_classes(ckpt.get('class_names'), class_names, osp.join(out_dir, LAST),
                           f'--tokens_path={args.tokens_path}' if token_batches else f'--data_path={args.data_path}')
    sampler, ld_train, ld_val = build_loaders(args, train_set, val_set, start_ep, start_it, device)

    # ------------------------------------------------------------------ build models, optimizer and trainer
    vae_local, var_wo_ddp, var = build_models(args, device, meta, len(train_set), init, class_names)
    del init
    task = VARTask(build_trainer(args, device, vae_local, var_wo_ddp, var, len(sampler)), args, out_dir, ld_val, token_batches)
    task.class_names = class_names   # in every checkpoint, and classes.json of save_pretrained
    if ckpt is not None:   # with --fsdp=1 the tensors are read now, into the sharded layout (another process count reshards)
        checkpoint_store(args).restore(task, ckpt, [task.trainer.var_opt.optimizer], skip=('trainer/vae_local/',))
        del ckpt

    # ------------------------------------------------------------------ train (utils/engine.py)
    return run_training(args, task, out_dir, CheckpointNames(LAST, PREV, BEST), train_set, ld_train, len(sampler), start_ep, start_it)


if __name__ == '__main__':
    run_main(lambda: main(parse_args()))
