"""`convert(module)`: the tokenizers and transformers inside `module` take this package's CPU paths, in place.

Every plain module of models/ that has a fast counterpart here becomes an instance of it: its class is swapped for
a subclass whose forward calls this package's kernels where they apply. Nothing else changes: the same parameters,
buffers, attribute values and state-dict keys, so checkpoints load either way and a converted model can be saved,
copied (EMA), wrapped (DDP, FSDP) and compiled as the plain one. Modules outside a VQVAE or a VAR are left alone.
"""
from typing import Callable, Dict, Type, TypeVar

import torch.nn as nn

from models import basic_var, basic_vae, quant, var, vqvae

from . import tokenizer, transformer
from .choices import log_choices_once

__all__ = ['convert', 'convert_tree', 'FAST_CLASSES']

M = TypeVar('M', bound=nn.Module)

# plain class → its fast subclass; matched by exact type, so a converted module (or a user's own subclass) is left alone
FAST_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Linear: transformer.Linear,
    basic_var.SharedAdaLin: transformer.SharedAdaLin,
    basic_var.FFN: transformer.FFN,
    basic_var.SelfAttention: transformer.SelfAttention,
    basic_var.AdaLNSelfAttn: transformer.AdaLNSelfAttn,
    basic_var.AdaLNBeforeHead: transformer.AdaLNBeforeHead,
    nn.Conv2d: tokenizer.Conv2d,
    quant.Phi: tokenizer.Phi,
    basic_vae.ResnetBlock: tokenizer.ResnetBlock,
    basic_vae.Upsample2x: tokenizer.Upsample2x,
    basic_vae.Encoder: tokenizer.Encoder,
    basic_vae.Decoder: tokenizer.Decoder,
    vqvae.VQVAE: tokenizer.VQVAE,
}


def _adopter(fast: Type[nn.Module]) -> Callable[[nn.Module], None]:
    """How a plain module becomes `fast`: its class's `adopt` where it converts children too, else the class swapped."""
    adopt = getattr(fast, 'adopt', None)
    if adopt is not None:
        return adopt

    def swap(m: nn.Module) -> None:
        m.__class__ = fast
    return swap


def convert_tree(root: nn.Module) -> nn.Module:
    """Convert every module of models/ inside `root`, whatever holds it (a lone block, a decoder), in place; returns root.
    `convert` is this for the VQVAEs and VARs inside a module."""
    for m in list(root.modules()):   # parents first: a block's `adopt` may convert its children before they are seen
        fast = FAST_CLASSES.get(type(m))
        if fast is not None:
            _adopter(fast)(m)
    return root


def convert(module: M) -> M:
    """Convert every VQVAE and VAR inside `module` (itself included; a VAR's tokenizer too) in place; returns `module`.

    Without this call the models compute exactly the reference's ops; with it they compute the same up to float
    rounding, faster on the CPU (see describe_choices()). `fast_paths(False)` switches the converted paths back to
    the plain ops at run time.
    """
    roots = [m for m in module.modules() if isinstance(m, (vqvae.VQVAE, var.VAR))]
    for root in roots:
        if isinstance(root, var.VAR):
            convert_tree(root.vae_proxy[0])
        convert_tree(root)
    if roots:
        log_choices_once()
    return module
