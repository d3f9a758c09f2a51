"""Freed memory kept for reuse while the tokenizer runs on the CPU without autograd (glibc's malloc, Linux).

PyTorch's CPU tensors come from malloc. glibc serves a request above its mmap threshold (dynamic, at most 32 MiB on
64-bit) by a fresh mapping and unmaps it when freed, so the next one faults its pages in again. The published
tokenizer's full-resolution activation is 40 MiB an image (160 × 256² floats): every conv, group-norm and SiLU output
of the decoder's last level was a fresh mapping, and its page faults cost as much as the op (a 40 MiB clone: 11 ms
fresh, 1.8 ms reused; a group norm at 256²: 7.4 ms against 2.7 ms, on a 2-core AMD EPYC). Inside
`reuse_freed_memory()` those blocks come from the heap and stay there when freed (mmap and trim thresholds of
1 GiB); on the way out the thresholds go back to the values glibc's dynamic rule ends at (32 MiB, trim at twice
that) and `malloc_trim(0)` hands the freed memory back, so resident memory after the block is what it would be
without it. Decoding 4 images at 256 px there: 3.77 → 3.30 s.

Process-wide while inside (malloc has no per-thread setting); the blocks do not nest their effects (an inner one
leaves the outer one's settings). Elsewhere (no glibc, another allocator preloaded and refusing mallopt) it does
nothing. The fast-path switch (switch.py) turns it off.
"""
import ctypes
import functools
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

from .switch import SWITCH

__all__ = ['reuse_freed_memory', 'glibc_malloc_tunable', 'REUSE_THRESHOLD_BYTES', 'RESTORED_MMAP_THRESHOLD_BYTES']

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3            # glibc's mallopt parameters (malloc.h)
REUSE_THRESHOLD_BYTES = 1 << 30
RESTORED_MMAP_THRESHOLD_BYTES = 32 << 20                  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit

_depth = {'n': 0}
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()   # glibc only: musl and others have no such symbol
        return libc if hasattr(libc, 'mallopt') and hasattr(libc, 'malloc_trim') else None
    except (OSError, AttributeError):
        return None


def glibc_malloc_tunable() -> bool:
    """Whether this process's malloc is glibc's and takes mallopt."""
    return _libc() is not None


def _set(mmap_threshold: int, trim_threshold: int) -> None:
    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)   # 0 (refused) leaves glibc's own setting: nothing to undo
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Inside: large blocks from the heap and kept when freed; after: glibc's usual thresholds, freed memory returned."""
    if not SWITCH.on or _libc() is None:
        yield
        return
    with _lock:
        _depth['n'] += 1
        outer = _depth['n'] == 1
        if outer:
            _set(REUSE_THRESHOLD_BYTES, REUSE_THRESHOLD_BYTES)
    try:
        yield
    finally:
        with _lock:
            _depth['n'] -= 1
            if outer:
                _set(RESTORED_MMAP_THRESHOLD_BYTES, 2 * RESTORED_MMAP_THRESHOLD_BYTES)
                _libc().malloc_trim(0)
