"""The one place the scripts make their models fast on the CPU: `speed_up(vae, var)` converts them with the optional
cpu_kernels package (same weights and state-dict keys; see cpu_kernels/__init__.py), or, where that package is absent,
says so and leaves the plain models, which are exact and complete."""
import logging
from typing import Optional, TypeVar

import torch.nn as nn

try:
    import cpu_kernels
except ImportError as e:   # optional: the project runs without it, slower on the CPU
    cpu_kernels, _missing = None, e
else:
    _missing: Optional[ImportError] = None

__all__ = ['speed_up', 'available', 'fast_paths_enabled']

logger = logging.getLogger(__name__)

M = TypeVar('M', bound=nn.Module)
_said = {'done': False}


def available() -> bool:
    """Whether cpu_kernels could be imported."""
    return cpu_kernels is not None


def speed_up(*modules: M) -> None:
    """cpu_kernels.convert each module in place (every VQVAE and VAR inside it), before any wrapping or compiling."""
    if cpu_kernels is None:
        if not _said['done']:
            _said['done'] = True
            logger.info('cpu_kernels is not importable (%s): the plain models run, exact and slower on the CPU', _missing)
        return
    for module in modules:
        cpu_kernels.convert(module)


def fast_paths_enabled() -> bool:
    """Whether converted models take their CPU paths now (cpu_kernels.fast_paths); False without the package."""
    return cpu_kernels is not None and cpu_kernels.fast_paths_enabled()
