"""Checkpoint files: written atomically with a checksum of their payload, verified and found again on resume
with a fallback to the previous one; temporary files of a killed run removed at the next start."""
import hashlib
import logging
import os
import re
import shutil
import socket
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from models.weights import fsync_dir, temporary_name
from utils.cli import UserError

__all__ = ['FileStore', 'save_atomic', 'copy_atomic', 'write_bytes_atomic', 'load_first_good', 'with_checksum', 'verify_checksum',
           'payload_digest', 'set_aside', 'remove_stale_temps', 'CHECKSUM_KEY', 'CheckpointDamagedError', 'ConfigMismatchError']

logger = logging.getLogger(__name__)

# An extra top-level entry: the reference's trainer reads only the entries it knows and ignores this one.
CHECKSUM_KEY = 'payload_sha256'
# the temporary names of save_atomic / write_bytes_atomic / copy_atomic, for the files this project writes
_TMP_RE = re.compile(r'^(?P<base>.+\.(?:pth|png|npz|json|safetensors))\.tmp-(?P<host>.+)-(?P<pid>\d+)$')
_noted_unchecked = set()   # paths already noted as having no checksum (one note per file and process)


class CheckpointDamagedError(UserError, RuntimeError):
    """No readable checkpoint among files that exist, or a checksum that does not match."""


class ConfigMismatchError(UserError, ValueError):
    """Resuming with flags that define another model."""


def _publish(tmp: str, path: str, prev_path: Optional[str]) -> None:
    """Rename tmp over path; the file it replaces becomes prev_path. No moment without a complete `path`."""
    if prev_path is not None and os.path.exists(path):
        prev_tmp = temporary_name(prev_path)
        try:
            os.link(path, prev_tmp)   # a second name for the current file, no copy
        except OSError:
            shutil.copy2(path, prev_tmp)
        os.replace(prev_tmp, prev_path)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def _write_atomic(path: str, write: Callable, prev_path: Optional[str] = None) -> None:
    """write(f) into a temporary file beside `path`, fsync, then rename (the replaced file becomes prev_path)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, prev_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj, path: str, prev_path: Optional[str] = None) -> None:
    """torch.save to a temporary file beside `path`, fsync, then rename; a kill never leaves a partial file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_atomic(path, lambda f: torch.save(obj, f), prev_path)


def write_bytes_atomic(data: bytes, path: str) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename, as save_atomic does for checkpoints."""
    _write_atomic(path, lambda f: f.write(data))


def copy_atomic(src: str, dst: str) -> None:
    tmp = temporary_name(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        _publish(tmp, dst, None)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FileStore:
    """The checkpoint files of DDP and one process: one .pth file each, written by the local master (utils/dcp_ckpt.py
    ShardedStore: the folders of --fsdp=1, with the same methods)."""
    suffix = '.pth'
    collective = False   # only the local master writes

    def path(self, path: str) -> str:
        return path

    def save(self, state_fn: Callable[[], Dict], path: str, prev_path: Optional[str] = None, best_path: Optional[str] = None) -> None:
        """(local master) state_fn()'s checkpoint with its checksum to `path` (the old file becomes prev_path; a copy to best_path)."""
        from dist import is_local_master
        if is_local_master():
            save_atomic(with_checksum(state_fn()), path, prev_path=prev_path)
            if best_path is not None:
                copy_atomic(path, best_path)

    def load_first_good(self, paths: Sequence[str], validate: Optional[Callable[[Dict], None]] = None):
        return load_first_good(paths, validate)

    @staticmethod
    def restore(task, ckpt: Dict, optimizers: Sequence[torch.optim.Optimizer] = (), skip: Sequence[str] = ()) -> None:
        """Load a checkpoint that load_first_good returned into the task (engine.TrainingTask)."""
        task.load_state_dict(ckpt)


# ---------------------------------------------------------------------- checksum
def _digest_into(h, obj) -> None:
    """Feed a canonical encoding of obj (nested dicts, lists, tuples, scalars, tensors) into the hash h."""
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().reshape(-1).contiguous().cpu()
        h.update(b'T' + f'{flat.dtype}|{tuple(obj.shape)}|'.encode())
        h.update(flat.view(torch.uint8).numpy() if flat.numel() else b'')
    elif isinstance(obj, dict):
        h.update(b'd%d|' % len(obj))
        for k, v in obj.items():
            _digest_into(h, k)
            _digest_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b'l' if isinstance(obj, list) else b't') + b'%d|' % len(obj))
        for v in obj:
            _digest_into(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(b'b' + repr(obj).encode())
    elif isinstance(obj, int):
        h.update(b'i' + str(obj).encode() + b'|')
    elif isinstance(obj, float):
        h.update(b'f' + struct.pack('<d', obj))
    elif isinstance(obj, str):
        data = obj.encode('utf-8', 'surrogatepass')
        h.update(b's%d|' % len(data) + data)
    elif isinstance(obj, bytes):
        h.update(b'y%d|' % len(obj) + obj)
    else:   # torch.dtype, torch.device and the like: their repr is stable
        h.update(b'r' + f'{type(obj).__name__}:{obj!r}|'.encode())


def payload_digest(state: Dict) -> str:
    """sha256 of every entry of a checkpoint dict except the checksum itself (tensor bytes, shapes, dtypes, keys, values)."""
    h = hashlib.sha256()
    _digest_into(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def with_checksum(state: Dict) -> Dict:
    """The checkpoint dict with the sha256 of its payload as one more top-level entry."""
    return {**state, CHECKSUM_KEY: payload_digest(state)}


def verify_checksum(ckpt, path: str) -> None:
    """Raise CheckpointDamagedError when the payload does not match its checksum (a flipped bit, a torn write).

    A file without a checksum (the reference's, or an older one of ours) is accepted with a note, once per file.
    """
    if not isinstance(ckpt, dict):
        return
    expected = ckpt.get(CHECKSUM_KEY)
    if expected is None:
        if path not in _noted_unchecked:
            _noted_unchecked.add(path)
            logger.info('note: %s has no payload checksum (written by the reference or an older version); '
                        'it is loaded without verifying its contents', path)
        return
    actual = payload_digest(ckpt)
    if actual != expected:
        raise CheckpointDamagedError(f'{path}: the contents do not match the checksum stored in the file '
                                     f'(sha256 {actual[:16]}…, expected {expected[:16]}…): the file was damaged after it was written')


def load_first_good(paths: Sequence[str], validate: Optional[Callable[[Dict], None]] = None
                    ) -> Tuple[Optional[Dict], Optional[str], List[str]]:
    """(checkpoint, its path, the damaged files tried before it) for the first of `paths` that exists, loads,
    matches its checksum and validates; (None, None, []) when none exists.

    A damaged file is reported and the next one is tried; if files exist but none is readable,
    CheckpointDamagedError names each one, why, and how to start over.
    """
    damaged, reasons = [], []
    for path in paths:
        if not os.path.exists(path):
            continue
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
            verify_checksum(ckpt, path)
            if validate is not None:
                validate(ckpt)
        except Exception as e:  # truncated, flipped bits, or of another layout
            reason = str(e)[:300]
            damaged.append(path)
            reasons.append(f'{path} ({type(e).__name__}: {reason})')
            logger.warning('checkpoint %s is damaged and is skipped: %s: %s', path, type(e).__name__, reason)
            continue
        if isinstance(ckpt, dict):
            ckpt.pop(CHECKSUM_KEY, None)
        if damaged:
            logger.warning('resuming from the previous good checkpoint %s', path)
        return ckpt, path, damaged
    if damaged:
        raise CheckpointDamagedError(f'no readable checkpoint to resume from: {len(damaged)} damaged: ' + '; '.join(reasons)
                                     + '. Move these files away to start from scratch, or use another --local_out_dir_path')
    return None, None, []


def set_aside(path: str) -> Optional[str]:
    """Rename a damaged checkpoint (a file, or an --fsdp=1 folder) to <path>.damaged (.damaged-2, ... for a folder when that
    is taken), so that it can never become the previous checkpoint."""
    dst, n = path + '.damaged', 1
    while os.path.isdir(path) and os.path.exists(dst):   # os.replace cannot put a folder over a non-empty one
        n += 1
        dst = f'{path}.damaged-{n}'
    try:
        os.replace(path, dst)
    except FileNotFoundError:   # another node's process on a shared file system was first
        return None
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return dst


# ---------------------------------------------------------------------- temporary files of a killed run
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str, bases: Optional[Sequence[str]] = None) -> Tuple[List[str], List[str]]:
    """Delete the temporary files (<name>.{pth,png,npz,json,safetensors}.tmp-<host>-<pid>, as the atomic writers
    name them) that a killed run left in `folder`; with `bases`, only those of these file names. Files of a process
    still running on this machine are kept. Returns (removed, kept)."""
    removed, kept = [], []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return removed, kept
    host = socket.gethostname()
    for name in names:
        m = _TMP_RE.match(name)
        path = os.path.join(folder, name)
        if m is None or not os.path.isfile(path) or os.path.islink(path) or (bases is not None and m.group('base') not in bases):
            continue
        pid = int(m.group('pid'))
        if m.group('host') == host and (pid == os.getpid() or _process_alive(pid)):
            kept.append(path)
            continue
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed, kept
