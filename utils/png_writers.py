"""PNG files encoded and written by a pool of processes while the caller goes on (sample.py: with the next batch).

Each file is written by utils.imgs.save_png_atomic, in the caller or in a worker: the same bytes, under a temporary
name, fsynced and renamed, so a kill at any moment leaves only complete PNGs (and temporary files that
utils.ckpt.remove_stale_temps removes). Processes, not threads: PIL encodes a PNG's pixel data through
ImagingEncoder.encode, which holds the GIL, so encoding threads would take turns with the sampling thread instead of
running beside it.
"""
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Deque, Optional, Sequence, Tuple

import numpy as np

from utils.cli import UserError
from utils.imgs import save_png_atomic

__all__ = ['PngWriteError', 'PngWriters', 'start_fork_server']


class PngWriteError(UserError):
    """A PNG could not be written (a full disk, a path that cannot be replaced, a worker that died)."""


def _worker_start(caller_alive) -> None:
    """In each worker: Ctrl-C goes to the whole process group, and the caller ends the pool, so a worker ignores it; and
    a worker ends itself once the caller is gone (a SIGKILLed caller cannot tell it to, and it would otherwise wait for
    work forever). caller_alive is the read end of a pipe whose write end only the caller holds: it reads as closed then.
    Neither the parent process id nor the fork server tells: the fork server outlives the caller while its children,
    these workers, live."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        try:
            caller_alive.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _pool_context(preload: Sequence[str] = ()):
    """forkserver where there is one: the caller has CUDA's and other threads running, and a child forked from it could
    start with a lock one of them held; the fork server is a clean single-threaded process. It imports this module and
    `preload` once, so each worker starts forked with them (PyTorch among them) instead of importing them again.
    multiprocessing also runs the caller's script again in each worker: name the script's module in `preload` (the
    '__main__' that multiprocessing offers is not preloaded by Python 3.11's fork server), and that run finds its
    imports done."""
    if 'forkserver' not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context('spawn')
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload([__name__, *preload])   # read when the server starts, ignored after
    return ctx


def start_fork_server(preload: Sequence[str] = ()) -> None:
    """Start the fork server of PngWriters now, without waiting for it: its imports then go on beside the caller's
    set-up (reading weights, building models) instead of delaying the first PNG. It ends when the caller does."""
    if _pool_context(preload).get_start_method() == 'forkserver':
        multiprocessing.forkserver.ensure_running()


def _failed(path: str, e: BaseException) -> PngWriteError:
    return PngWriteError(f'cannot write {path}: {type(e).__name__}: {e}; the complete PNGs are kept: fix the cause (disk '
                         f'space, permissions, what is at that path) and rerun the same command to finish the set')


class PngWriters:
    """Write (H, W, 3) uint8 images as PNG files in `workers` processes, at most `max_pending` images queued or being
    written (the caller waits for the oldest beyond that, so host memory stays bounded); workers=0 writes each one at
    once in the caller. preload: modules the workers need imported (see _pool_context). A failed write raises
    PngWriteError, naming the file, from the next write() or drain().

    Use as a context manager: leaving normally waits for every file; leaving by an exception drops the queued ones
    (those being written are finished: complete files) and stops the workers.
    """

    def __init__(self, workers: int, max_pending: int, preload: Sequence[str] = ()):
        self.workers, self.max_pending = workers, max(1, max_pending)
        self._pending: Deque[Tuple[Future, str]] = deque()   # in submission order
        self._pool: Optional[ProcessPoolExecutor] = None
        if workers > 0:
            ctx = _pool_context(preload)
            alive_r, self._alive_w = ctx.Pipe(duplex=False)   # the caller never writes: its end closes when it ends
            self._pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_start, initargs=(alive_r,))

    def write(self, img_HW3: np.ndarray, path: str) -> None:
        if self._pool is None:
            try:
                save_png_atomic(img_HW3, path)
            except Exception as e:
                raise _failed(path, e) from e
            return
        self._collect()
        while len(self._pending) >= self.max_pending:
            self._wait_oldest()
        self._pending.append((self._pool.submit(save_png_atomic, img_HW3, path), path))

    def drain(self) -> None:
        """Wait until every file given so far is written (raises PngWriteError for the first that failed)."""
        while self._pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        fut, path = self._pending[0]
        e = fut.exception()   # waits
        if e is not None:
            raise _failed(path, e) from e
        self._pending.popleft()

    def _collect(self) -> None:
        """Forget the finished files at the front; raise for any file that failed, wherever it is in the queue."""
        while self._pending and self._pending[0][0].done():
            self._wait_oldest()
        for fut, path in self._pending:
            if fut.done() and fut.exception() is not None:
                raise _failed(path, fut.exception()) from fut.exception()

    def close(self, wait: bool = True) -> None:
        """wait: write every file given first (raising for a failed one); else drop the queued ones."""
        try:
            if wait:
                self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)   # nothing is queued any more after a drain
                self._pool = None
                self._alive_w.close()
            self._pending.clear()

    def __enter__(self) -> 'PngWriters':
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)
