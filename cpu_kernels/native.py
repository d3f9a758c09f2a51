"""This package's C kernels (csrc/): compiled on first use with the system's C compiler, cached on disk, loaded by ctypes.

A kernel here is plain C with x86 intrinsics and no PyTorch headers, so any C11 compiler builds it on the spot and
there is no build step at install time. It is compiled only where the CPU's rule uses it (cpu_rules.py),
the first time a model needs it, into `$VAR_KERNEL_CACHE` (default `$XDG_CACHE_HOME/var_kernels`, else
`~/.cache/var_kernels`), under a name made from the source, the headers of csrc/, the flags and the compiler's version:
an edited source or header is rebuilt, a cached one is loaded as is. The library is written under a temporary name and
renamed into place, so processes starting together (torchrun) never load half a file. Where there is no compiler, the cache cannot be
written or the build fails, `library` says why and the caller keeps PyTorch's kernel (nothing is wrong, only slower);
the reason is logged once.

ctypes releases the GIL during a call, so `run_split` runs one call per thread over disjoint parts of the work, as many
threads as PyTorch's intra-op pool (`torch.get_num_threads()`), which is idle meanwhile.
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ['CSRC', 'CFLAGS', 'cache_dir', 'library', 'run_split']

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name('csrc')
CFLAGS = ('-O3', '-std=c11', '-mavx512f', '-mfma', '-shared', '-fPIC')
_BUILD_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where compiled kernels are kept: $VAR_KERNEL_CACHE, else $XDG_CACHE_HOME/var_kernels, else ~/.cache/var_kernels."""
    if os.environ.get('VAR_KERNEL_CACHE'):
        return Path(os.environ['VAR_KERNEL_CACHE'])
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'var_kernels'


def _compiler() -> Tuple[Optional[str], str]:
    """(path of $CC or cc, its version line), or (None, why not)."""
    name = os.environ.get('CC') or 'cc'
    path = shutil.which(name)
    if path is None:
        return None, f'no C compiler ({name!r} not found; set CC)'
    try:
        version = subprocess.run([path, '--version'], capture_output=True, text=True, timeout=30).stdout.split('\n')[0]
    except (OSError, subprocess.SubprocessError) as e:
        return None, f'the C compiler {path} does not run ({e})'
    return path, version


def _build(source: Path, target: Path, cc: str) -> Optional[str]:
    """Compile `source` into `target` atomically; None, or why it failed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + '.', suffix='.tmp')
    os.close(fd)
    try:
        done = subprocess.run([cc, *CFLAGS, '-o', tmp, str(source), '-lm'], capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if done.returncode != 0:
            return f'{cc} failed on {source.name}: {done.stderr.strip()[-500:]}'
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return f'building {source.name} failed ({e})'
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def library(name: str) -> Tuple[Optional[ctypes.CDLL], str]:
    """(the loaded library of csrc/<name>.c, where it is), or (None, why not); built at the first call of a process
    if the cache has no build of this source, these flags and this compiler."""
    source = CSRC / f'{name}.c'
    cc, version = _compiler()
    if cc is None:
        return _unavailable(name, version)
    headers = b''.join(h.read_bytes() for h in sorted(CSRC.glob('*.h')))   # what a source may include
    digest = hashlib.sha256(source.read_bytes() + headers + ' '.join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f'{name}-{digest}.so'
    if not target.exists():
        try:
            error = _build(source, target, cc)
        except OSError as e:   # the cache directory cannot be made or written
            error = f'cannot write the kernel cache {target.parent} ({e}); set VAR_KERNEL_CACHE'
        if error:
            return _unavailable(name, error)
    try:
        return ctypes.CDLL(str(target)), str(target)
    except OSError as e:
        return _unavailable(name, f'cannot load {target} ({e})')


def _unavailable(name: str, why: str) -> Tuple[None, str]:
    logger.warning('C kernel %s unavailable, PyTorch\'s kernel is used instead: %s', name, why)
    return None, why


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix='var_kernels')


def run_split(fn: Callable[..., int], n: int, args: Sequence) -> None:
    """fn(begin, end, *args) over [0, n) in torch.get_num_threads() contiguous parts at once; fn returns 0, or 1 when
    it could not allocate its working memory (raised here as MemoryError)."""
    parts = max(1, min(torch.get_num_threads(), n))
    bounds = [n * i // parts for i in range(parts + 1)]
    others = [_pool(parts - 1).submit(fn, bounds[i], bounds[i + 1], *args) for i in range(1, parts)] if parts > 1 else []
    status = [fn(bounds[0], bounds[1], *args)] + [f.result() for f in others]
    if any(status):
        raise MemoryError(f'{getattr(fn, "__name__", "a C kernel")} could not allocate its working memory')
