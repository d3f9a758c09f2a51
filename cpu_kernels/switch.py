"""Whether a fast path may run: the one process-wide switch, and what the execution context allows.

`set_fast_paths(False)` (or `with fast_paths(False):`) makes every kernel of this package take its plain
reference path, the ops the reference implementation calls, in every converted model (convert.py). The switch is on
by default; importing changes nothing. It is process-wide: it applies to every converted model at once.
"""
import contextlib
import logging
from typing import Iterator

import torch

__all__ = ['fast_paths', 'set_fast_paths', 'fast_paths_enabled', 'cpu_autocast_enabled', 'compiling']

logger = logging.getLogger(__name__)


class _Switch:
    """The switch's state; the kernels read `SWITCH.on` (one attribute lookup per call)."""
    __slots__ = ('on',)

    def __init__(self):
        self.on = True


SWITCH = _Switch()


def fast_paths_enabled() -> bool:
    """Whether the fast paths are on (they still run only where they apply: see each kernel)."""
    return SWITCH.on


def set_fast_paths(enabled: bool) -> None:
    """Turn every fast path of cpu_kernels on (default) or off (the reference's plain ops), process-wide."""
    if not isinstance(enabled, bool):
        raise TypeError(f'set_fast_paths takes True or False, got {enabled!r}')
    if enabled != SWITCH.on:
        logger.info('cpu_kernels: fast paths %s', 'on' if enabled else 'off (the reference\'s plain ops)')
    SWITCH.on = enabled


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """`with fast_paths(False): ...` runs the block on the plain reference paths, then restores the previous setting."""
    previous = SWITCH.on
    set_fast_paths(enabled)
    try:
        yield
    finally:
        SWITCH.on = previous


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on (it asks for bfloat16/float16 matmuls and convs, which the float32 CPU kernels are not)."""
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:   # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def plain_cpu_float32(x: torch.Tensor) -> bool:
    """Whether `x` is a float32 CPU tensor computed in float32 as written: CPU autocast off, torch.compile not tracing.
    Every CPU float32 fast path starts from this; each adds its own conditions (autograd, library, CPU rule)."""
    return x.device.type == 'cpu' and x.dtype == torch.float32 and not cpu_autocast_enabled() and not compiling()


def compiling() -> bool:
    """Whether torch.compile is tracing (`--tfast`/`--vfast`): it lowers F.linear and F.conv2d itself, and cannot
    lower oneDNN's linear with a trainable weight."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:   # torch < 2.3
        return torch._dynamo.is_compiling()
