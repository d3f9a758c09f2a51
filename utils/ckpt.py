"""Checkpoint files written atomically, and found again on resume with a fallback to the previous one."""
import logging
import os
import shutil
import socket
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from utils.cli import UserError

__all__ = ['save_atomic', 'copy_atomic', 'write_bytes_atomic', 'load_first_good', 'CheckpointDamagedError', 'ConfigMismatchError']

logger = logging.getLogger(__name__)


class CheckpointDamagedError(UserError, RuntimeError):
    """No readable checkpoint among files that exist."""


class ConfigMismatchError(UserError, ValueError):
    """Resuming with flags that define another model."""


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    return f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'


def _publish(tmp: str, path: str, prev_path: Optional[str]) -> None:
    """Rename tmp over path; the file it replaces becomes prev_path. No moment without a complete `path`."""
    if prev_path is not None and os.path.exists(path):
        prev_tmp = _tmp_name(prev_path)
        try:
            os.link(path, prev_tmp)   # a second name for the current file, no copy
        except OSError:
            shutil.copy2(path, prev_tmp)
        os.replace(prev_tmp, prev_path)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_atomic(obj, path: str, prev_path: Optional[str] = None) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename; a kill never leaves a partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, prev_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename, as save_atomic does for checkpoints."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, None)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy_atomic(src: str, dst: str) -> None:
    tmp = _tmp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        _publish(tmp, dst, None)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_first_good(paths: Sequence[str], validate: Optional[Callable[[Dict], None]] = None) -> Tuple[Optional[Dict], Optional[str]]:
    """The first of `paths` that exists, loads and validates; (None, None) when none exists.

    A damaged file is reported and the next one is tried; if files exist but none is readable,
    CheckpointDamagedError says which and how to start over.
    """
    damaged = []
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
            if validate is not None:
                validate(ckpt)
        except Exception as e:  # truncated, corrupt or of another layout
            damaged.append(f'{path} ({type(e).__name__}: {str(e)[:200]})')
            logger.warning('checkpoint %s is damaged and is skipped: %s: %s', path, type(e).__name__, str(e)[:200])
            continue
        if damaged:
            logger.warning('resuming from the previous good checkpoint %s', path)
        return ckpt, path
    if damaged:
        raise CheckpointDamagedError('no readable checkpoint to resume from: ' + '; '.join(damaged)
                                     + '. Move these files away to start from scratch, or use another --local_out_dir_path')
    return None, None
