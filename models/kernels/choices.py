"""Which fast path each operation takes here, and why: one log line per kernel, once per process."""
import logging
from typing import List

import torch

from .conv import onednn_conv_available
from .matmul import fused_mlp_func, onednn_available
from .memory import CHANNELS_LAST_MIN_WIDTH, CPU_CHUNK_BYTES
from .switch import SWITCH
from .winograd import WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_HW, nnpack_available

__all__ = ['describe_choices', 'describe_attention', 'log_choices_once']

logger = logging.getLogger('models.kernels')

_logged = {'done': False}


def _on_off(fast: bool, available: bool, where: str, missing: str) -> str:
    if not fast:
        return 'off (fast paths switched off: the reference\'s op)'
    return f'on ({where})' if available else f'off ({missing})'


def describe_choices() -> List[str]:
    """One line per kernel: on or off, where it applies and why (the switch, what this PyTorch build and CPU have)."""
    fast = SWITCH.on
    onednn, nnpack = onednn_available(), nnpack_available()
    f32_cpu = 'float32 CPU, autocast and torch.compile off'
    return [
        'oneDNN linear: ' + _on_off(fast, onednn, f'{f32_cpu}, oneDNN available', 'this PyTorch build or CPU has no oneDNN; F.linear'),
        'Winograd 3x3 conv (NNPACK): ' + _on_off(
            fast, nnpack, f'{f32_cpu}, no autograd, >= {WINOGRAD_MIN_CHANNELS} channels and >= {WINOGRAD_MIN_HW} positions, NNPACK available',
            'this PyTorch build or CPU has no NNPACK; the direct conv'),
        'polyphase upsampling: ' + _on_off(fast, True, 'every Upsample2x whose 3x3 conv does not go by Winograd', ''),
        'channels-last tokenizer convs: ' + _on_off(fast, True, f'tokenizers of width >= {CHANNELS_LAST_MIN_WIDTH}; NCHW where Winograd applies', ''),
        'in-place residual adds: ' + _on_off(fast, True, 'tokenizer without autograd', ''),
        'tokenizer in groups of images: ' + _on_off(fast, True, f'CPU without autograd, {CPU_CHUNK_BYTES >> 20} MiB of activation per group', ''),
        'grouped block-causal attention: ' + _on_off(fast, True, 'teacher forcing, any backend but math', ''),
        'batch-invariant oneDNN conv: ' + ('on (float32 CPU inference, whatever the switch: a reproducibility guarantee)'
                                           if onednn_conv_available() and torch.backends.mkldnn.enabled else
                                           'off (this PyTorch build or CPU has no oneDNN conv; F.conv2d)'),
        'flash-attn fused MLP: ' + ('no CUDA' if not torch.cuda.is_available() else
                                    'on (CUDA, models built with fused_if_available)' if fused_mlp_func() is not None else
                                    'off (flash-attn fused_dense not installed; linear + GELU)'),
    ]


def describe_attention() -> str:
    """The attention backend a model built with flash_if_available=True takes here."""
    from .attention_dispatch import choose_backend, describe_backends
    return f'attention: {describe_backends(choose_backend(True))}'


def log_choices_once() -> None:
    """Log describe_choices() at INFO the first time a model is built in this process."""
    if _logged['done']:
        return
    _logged['done'] = True
    logger.info('fast kernels (models.kernels.set_fast_paths to switch):\n  %s', '\n  '.join(describe_choices()))
