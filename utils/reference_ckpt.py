"""Checkpoints written by the reference's train.py: fill in what its `args` do not record, from the weights' shapes."""
import logging
import re
from typing import Dict, List

__all__ = ['is_reference_ckpt', 'complete_reference_args']

logger = logging.getLogger(__name__)

# what this project's train.py records in `args` and the reference's does not
_OWN_KEYS = ('num_classes', 'vocab_size', 'z_channels', 'vae_ch', 'share_quant_resi', 'world_size')


def is_reference_ckpt(ckpt: Dict) -> bool:
    """A checkpoint in the reference's layout (epoch, iter, trainer, args) whose args lack this project's keys."""
    return isinstance(ckpt.get('args'), dict) and any(k not in ckpt['args'] for k in _OWN_KEYS)


def _share_quant_resi(vae_sd: Dict) -> int:
    if any(k.startswith('quantize.quant_resi.qresi.') for k in vae_sd):
        return 1
    shared = {int(m.group(1)) for k in vae_sd for m in [re.match(r'quantize\.quant_resi\.qresi_ls\.(\d+)\.', k)] if m}
    return len(shared) if shared else 0   # quant_resi.<i>.*: one conv per scale


def complete_reference_args(ckpt: Dict) -> List[str]:
    """Add the keys this project needs to a reference checkpoint's args, in place; returns 'key=value (from ...)' notes.

    The class count and the tokenizer's shape come from the saved state dicts (the reference hard-codes
    its tokenizer and counts the class folders, recording neither); the number of processes from its
    batch sizes; `bs` becomes the images per optimizer step (the reference's bs leaves out --ac).
    """
    args, trainer = ckpt['args'], ckpt['trainer']
    var_sd, vae_sd = trainer['var_wo_ddp'], trainer.get('vae_local', {})
    notes = []

    def fill(key, value, source):
        if key not in args:
            args[key] = value
            notes.append(f'{key}={value} (from {source})')

    fill('num_classes', var_sd['class_emb.weight'].shape[0] - 1, 'class_emb.weight: classes + 1 rows')
    fill('vocab_size', var_sd['head.weight'].shape[0], 'head.weight')
    fill('z_channels', var_sd['word_embed.weight'].shape[1], 'word_embed.weight')
    if 'encoder.conv_in.weight' in vae_sd:
        fill('vae_ch', vae_sd['encoder.conv_in.weight'].shape[0], 'vae_local encoder.conv_in.weight')
        fill('share_quant_resi', _share_quant_resi(vae_sd), 'vae_local quant_resi keys')
    glb, per_proc, ac = args.get('glb_batch_size'), args.get('batch_size'), args.get('ac', 1)
    if glb and per_proc:
        fill('world_size', glb // per_proc, 'glb_batch_size / batch_size')
        if args.get('bs') == glb and ac > 1:   # the reference's bs: one micro step of all processes
            args['bs'] = glb * ac
            notes.append(f'bs={glb * ac} (glb_batch_size x ac: images per optimizer step)')
    if args.get('seed') is None:
        notes.append('seed: none recorded (the reference run had no --seed), a new one is drawn')
    return notes
