"""Which fast path each operation takes on this CPU, and why: one table of rules, one log line per kernel, once.

Three fast paths replace PyTorch's kernel by another one, and whether that pays depends on the CPU: oneDNN's
matmul instead of MKL's for the float32 linear layers (matmul.py), NNPACK's Winograd instead of oneDNN's direct
3×3 conv (winograd.py), this package's C kernel instead of PyTorch's flash kernel for attention
(c_attention.py). They are chosen from the CPU's vendor, ISA flags and core count by the first matching rule
of CPU_RULES; never by timing, so the same machine always takes the same kernels. Where nothing was measured the
rule keeps PyTorch's plain kernel. The table (with each rule's reason) is in cpu_rules.py, torch-free;
`python bench.py cpu` prints the rule matched.

The other fast paths do fewer operations, move fewer bytes or keep fewer activations with PyTorch's own kernels
(polyphase upsampling, 3×3 convs to a few channels by taps, channels-last layout, in-place residual adds, images in
groups with their large activations from the heap, block-causal attention by groups of scales, the training MLP and
AdaLN recomputing their GELU and layer norm in the backward), so they do not depend on the CPU and stay on wherever
they apply. `set_fast_paths(False)` turns all of them off.
"""
import functools
import logging
from typing import List

import torch

from models.attention import choose_backend, describe_backends

from .cpu_rules import CpuRule, read_cpu_features, rule_for
from .switch import SWITCH
from .threads import describe_openmp_spin

__all__ = ['cpu_rule', 'describe_choices', 'describe_attention', 'log_choices_once']

logger = logging.getLogger('cpu_kernels')

_logged = {'done': False}


@functools.lru_cache(maxsize=None)
def cpu_rule() -> CpuRule:
    """The rule of this machine, read once per process (`cpu_rule.cache_clear()` to read the CPU again)."""
    return rule_for(read_cpu_features())


def _on_off(fast: bool, available: bool, where: str, missing: str) -> str:
    if not fast:
        return 'off (fast paths switched off: the reference\'s op)'
    return f'on ({where})' if available else f'off ({missing})'


def describe_choices() -> List[str]:
    """One line per kernel: on or off, where it applies and why (the switch, the CPU's rule, this PyTorch build)."""
    # imported here, not at the top: the kernels read this module's cpu_rule()
    from .c_attention import C_HEAD_DIM, status as c_attention_status
    from .conv import onednn_conv_available
    from .heap import glibc
    from models.basic_var import fused_mlp_func
    from .matmul import onednn_available
    from .memory import CHANNELS_LAST_MIN_WIDTH, CPU_CHUNK_BYTES
    from .narrow_conv import NARROW_MAX_OUT_CHANNELS, NARROW_MIN_IN_CHANNELS
    from .c_winograd import status as c_winograd_status
    from .winograd import WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_HW, nnpack_available
    fast, rule = SWITCH.on, cpu_rule()
    c_status = c_attention_status() if fast else ''
    onednn, nnpack = onednn_available(), nnpack_available()
    c_winograd = c_winograd_status() if fast and rule.winograd else 'not chosen'
    winograd_by = ('this package\'s F(4x4, 3x3) C kernel, channels-last, reading norm + SiLU or x2 upsampling (c_winograd.py)'
                   if not c_winograd else
                   f'NNPACK\'s F(6x6, 3x3), NCHW (the C kernel: {c_winograd})')
    f32_cpu = 'float32 CPU, autocast and torch.compile off'
    by_cpu = f'this CPU ({read_cpu_features().describe()}) matches "{rule.cpus}": {rule.why}'
    return [
        'CPU rule: ' + by_cpu,
        'oneDNN linear: ' + _on_off(fast, onednn and rule.onednn_linear, f'{f32_cpu}, oneDNN available, chosen for this CPU',
                                    'this PyTorch build or CPU has no oneDNN; F.linear' if not onednn else 'not chosen for this CPU; F.linear'),
        'Winograd 3x3 conv: ' + _on_off(
            fast, (nnpack or not c_winograd) and rule.winograd,
            f'{f32_cpu}, no autograd, >= {WINOGRAD_MIN_CHANNELS} channels and >= {WINOGRAD_MIN_HW} positions, chosen for this CPU: {winograd_by}',
            'not chosen for this CPU; the direct conv' if not rule.winograd else
            f'the C kernel: {c_winograd}, and this PyTorch build or CPU has no NNPACK; the direct conv'),
        'polyphase upsampling: ' + _on_off(fast, True, 'Upsample2x on the CPU' + (
            ' where the C Winograd kernel does not read it' if not c_winograd else ', NNPACK\'s Winograd or not (fewer multiply-adds than upsampling first)'), ''),
        '3x3 convs to a few channels by taps: ' + _on_off(fast, True, f'{f32_cpu}, no autograd, <= {NARROW_MAX_OUT_CHANNELS} outputs from >= {NARROW_MIN_IN_CHANNELS} inputs (the decoder\'s conv to RGB)', ''),
        'channels-last tokenizer convs: ' + _on_off(fast, True, f'tokenizers of width >= {CHANNELS_LAST_MIN_WIDTH}; NCHW where NNPACK\'s Winograd applies', ''),
        'in-place residual adds: ' + _on_off(fast, True, 'tokenizer without autograd', ''),
        'tokenizer in groups of images: ' + _on_off(fast, True, f'CPU without autograd, {CPU_CHUNK_BYTES >> 20} MiB of activation per group', ''),
        'tokenizer activations from the heap: ' + _on_off(fast, glibc() is not None, 'CPU without autograd, glibc: its mmap threshold raised during the call (heap.py)',
                                                          'the C library is not glibc'),
        'grouped block-causal attention: ' + _on_off(fast, True, 'teacher forcing, any backend but math', ''),
        'CPU teacher-forcing attention in one function: ' + _on_off(fast, True, 'float32 CPU, block-causal mask, no attention dropout, autocast and torch.compile off: L2 norm, groups of scales and head merge, gradients into the qkv layout (block_causal.py)', ''),
        'C attention kernel: ' + _on_off(fast, not c_status, f'float32 CPU, head dim {C_HEAD_DIM}, chosen for this CPU: teacher forcing in the function above '
                                         f'(forward and backward) and sampling against the KV cache (c_attention.py, built once: native.py)',
                                         f'{c_status}; PyTorch\'s flash kernel'),
        'training MLP recomputing its GELU: ' + _on_off(fast, True, f'{f32_cpu}; GEMMs by the linear layers\' choice', ''),
        'training AdaLN recomputing LN(x): ' + _on_off(fast, True, 'training without autocast, any device', ''),
        'batch-invariant oneDNN conv: ' + ('on (float32 CPU inference, whatever the switch: a reproducibility guarantee)'
                                           if onednn_conv_available() and torch.backends.mkldnn.enabled else
                                           'off (this PyTorch build or CPU has no oneDNN conv; F.conv2d)'),
        'flash-attn fused MLP: ' + ('no CUDA' if not torch.cuda.is_available() else
                                    'on (CUDA, models built with fused_if_available)' if fused_mlp_func() is not None else
                                    'off (flash-attn fused_dense not installed; linear + GELU)'),
        describe_openmp_spin(),
    ]


def describe_attention() -> str:
    """The attention backend a model built with flash_if_available=True takes here."""
    return f'attention: {describe_backends(choose_backend(True))}'


def log_choices_once() -> None:
    """Log describe_choices() at INFO the first time a model is converted in this process."""
    if _logged['done']:
        return
    _logged['done'] = True
    logger.info('fast kernels (cpu_kernels.fast_paths to switch):\n  %s', '\n  '.join(describe_choices()))
