"""Large activations from the heap while the tokenizer runs on the CPU (glibc), so that their pages are not faulted in anew.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free. The
tokenizer's activations at 256 px are 10-42 MB, so each of them comes as new, zeroed pages from the kernel, and a
decode or tokenisation faults in all of its activations' pages anew, a page fault per 4 KiB page.
`large_buffers_from_heap()` raises the mmap and trim thresholds for the duration of a
call, so that a freed activation's memory serves the next one of the same size; on the way out it hands the free
memory back (malloc_trim) and sets the thresholds to the values glibc's own dynamic rule reaches once a block of
32 MiB has been freed (mmap 32 MiB, trim 64 MiB; setting them turns that rule off for the process). The price: freed
blocks wait in the heap, so the process's peak resident memory around those calls is somewhat higher.

Used by `in_image_groups` (memory.py), i.e. for CPU inference with the fast paths on. A no-op where the C library
is not glibc. Nested and concurrent uses share one setting (the first in sets it, the last out restores it).
"""
import contextlib
import ctypes
import functools
import threading
from typing import Iterator, Optional

__all__ = ['large_buffers_from_heap', 'glibc']

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # mallopt parameters (malloc.h)
_INSIDE = 1 << 30                                 # while inside: every activation from the heap, none trimmed
_AFTER_MMAP, _AFTER_TRIM = 32 << 20, 64 << 20     # glibc's dynamic values after a 32 MiB block was freed

_lock = threading.Lock()
_depth = {'n': 0}


@functools.lru_cache(maxsize=None)
def glibc() -> Optional[ctypes.CDLL]:
    """The process's C library if it is glibc (it has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim   # AttributeError elsewhere (musl, macOS, Windows)
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def large_buffers_from_heap() -> Iterator[None]:
    libc = glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth['n'] += 1
        if _depth['n'] == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, _INSIDE)
            libc.mallopt(_M_TRIM_THRESHOLD, _INSIDE)
    try:
        yield
    finally:
        with _lock:
            _depth['n'] -= 1
            if _depth['n'] == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM)
                libc.malloc_trim(0)
