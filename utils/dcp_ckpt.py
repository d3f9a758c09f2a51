"""Sharded checkpoints (--fsdp=1): torch.distributed.checkpoint (DCP) folders, written by every process in parallel.

A checkpoint is a folder <name>.dcp holding DCP's shard files (*.distcp, each process writes its own) and `.metadata`
with every tensor of the checkpoint dict (weights, optimizer moments, EMA: DTensor shards under FSDP2), `meta.pth`
with the rest (epoch, iteration, args, the optimizer's groups, ... with a marker where a tensor was), and
`manifest.json`, written last, with the sha256 and size of every other file. The folder is written under a temporary
name and renamed; the folder it replaces becomes <prev>. Loading verifies the manifest (the files are shared out
among the processes to hash), and reads the tensors into the layout of the models as they are built now: a checkpoint
of 2 processes resumes on 1 or 4 (DCP reshards).
"""
import contextlib
import hashlib
import json
import logging
import os
import os.path as osp
import re
import shutil
import socket
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import dist
from models.weights import fsync_dir
from utils.ckpt import CheckpointDamagedError, _process_alive

__all__ = ['ShardedStore', 'flatten_tensors', 'fill_tensors', 'marked_keys', 'read_full', 'materialize_optimizer_state', 'MANIFEST', 'META',
           'SUFFIX']

logger = logging.getLogger(__name__)

SUFFIX = '.dcp'
MANIFEST, META = 'manifest.json', 'meta.pth'
TENSOR = '<dcp tensor>'   # in meta.pth: a tensor stored in the shard files under its path joined by '/'
_STALE_RE = re.compile(r'^.+\.dcp\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)$')


# ---------------------------------------------------------------------- checkpoint dict <-> (tensors, the rest)
def flatten_tensors(state: Dict, prefix: str = '') -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(every tensor of the nested dicts, keyed by its path joined by '/'; the dict with TENSOR in their place)."""
    tensors, rest = {}, {}
    for k, v in state.items():
        key = f'{prefix}{k}'
        if isinstance(v, torch.Tensor):
            tensors[key], rest[k] = v, TENSOR
        elif isinstance(v, dict):
            sub_t, rest[k] = flatten_tensors(v, key + '/')
            tensors.update(sub_t)
        else:
            rest[k] = v
    return tensors, rest


def fill_tensors(rest: Dict, tensors: Dict[str, torch.Tensor], prefix: str = '') -> Dict:
    """The inverse of flatten_tensors: the dict with its tensors back (a TENSOR marker without a tensor stays)."""
    out = {}
    for k, v in rest.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out[k] = fill_tensors(v, tensors, key + '/')
        else:
            out[k] = tensors.get(key, v) if isinstance(v, str) and v == TENSOR else v
    return out


def marked_keys(rest: Dict, prefix: str = '') -> List[str]:
    """The paths of the TENSOR markers of a dict that flatten_tensors left."""
    keys = []
    for k, v in rest.items():
        if isinstance(v, dict):
            keys += marked_keys(v, f'{prefix}{k}/')
        elif isinstance(v, str) and v == TENSOR:
            keys.append(f'{prefix}{k}')
    return keys


def materialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create an optimizer's lazy state (moments, step) with one step of zero gradients at learning rate 0, which leaves every
    weight as it is, so that a checkpoint can be loaded into it (DCP loads into existing tensors only)."""
    if optimizer.state:
        return
    lrs = [g['lr'] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g['lr'] = 0.0
        for p in g['params']:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g['lr'] = lr


# ---------------------------------------------------------------------- files
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            h.update(chunk)
    return h.hexdigest()


def _shard_files(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if n != MANIFEST and osp.isfile(osp.join(folder, n)))


def _hash_shared_out(folder: str, names: Sequence[str]) -> Dict[str, str]:
    """sha256 of each file, the files shared out among the processes (a collective); every process gets them all."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {n: _sha256(osp.join(folder, n)) for n in names[rank::world]}
    out = {}
    for part in dist.all_gather_object(mine):
        out.update(part)
    return out


def _fsync_file(path: str) -> None:
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def _replace_dir(src: str, dst: str, keep_as: Optional[str] = None) -> None:
    """Rename folder src to dst; the folder dst was becomes keep_as (whose old folder is deleted), or is deleted."""
    trash = f'{dst}.old-{socket.gethostname()}-{os.getpid()}'
    if osp.exists(dst):
        if keep_as is not None:
            if osp.exists(keep_as):
                os.replace(keep_as, trash)
            os.replace(dst, keep_as)
        else:
            os.replace(dst, trash)
    os.replace(src, dst)
    fsync_dir(osp.dirname(osp.abspath(dst)))
    if osp.exists(trash):
        shutil.rmtree(trash)


def _link_copy(src: str, tmp: str) -> None:
    """A copy of the folder src as tmp, by hard links where the file system allows (no data copied)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, tmp, copy_function=link)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is what --fsdp=1 on one process means."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def read_full(folder: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, whole, on the CPU, in this one process (tools/consolidate_ckpt.py)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    md = dcp.FileSystemReader(folder).read_metadata()
    full = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}
    with _single_process_quiet():
        dcp.load(full, checkpoint_id=folder)
    return full


class ShardedStore:
    """The checkpoint files of --fsdp=1: DCP folders. Every process calls every method (they are collectives)."""
    suffix = SUFFIX
    collective = True   # every process writes its shards: every process must decide to save at the same step

    def path(self, path: str) -> str:
        """The folder of a checkpoint name (ar-ckpt-last.pth → ar-ckpt-last.dcp)."""
        return (path[:-len('.pth')] if path.endswith('.pth') else path) + SUFFIX

    # ------------------------------------------------------------------ write
    def save(self, state_fn: Callable[[], Dict], path: str, prev_path: Optional[str] = None, best_path: Optional[str] = None) -> None:
        """Write state_fn()'s checkpoint to the folder `path` (the old one becomes prev_path; a copy goes to best_path)."""
        import torch.distributed.checkpoint as dcp
        tensors, rest = flatten_tensors(state_fn())
        tmp = dist.broadcast_object(f'{path}.tmp-{socket.gethostname()}-{os.getpid()}')
        if dist.is_master():
            if osp.exists(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        dist.barrier()
        with _single_process_quiet():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))   # each process writes its shards
        if dist.is_master():
            meta_path = osp.join(tmp, META)
            torch.save(rest, meta_path)
            _fsync_file(meta_path)
        dist.barrier()
        names = dist.broadcast_object(_shard_files(tmp) if dist.is_master() else None)
        # a process that cannot see rank 0's files: the output folder is not shared between the machines (every process stops)
        unseen = [(r, m) for r, m in enumerate(dist.all_gather_object([n for n in names if not osp.isfile(osp.join(tmp, n))])) if m]
        if unseen:
            raise CheckpointDamagedError(f'{tmp}: rank {unseen[0][0]} cannot see the files {unseen[0][1][:3]} that the other processes '
                                         'wrote: with --fsdp=1 every process writes into the same checkpoint folder, so '
                                         '--local_out_dir_path must be on storage shared by all machines')
        sha = _hash_shared_out(tmp, names)
        if dist.is_master():
            manifest = {'format': 'var-dcp-1', 'world_size': dist.get_world_size(),
                        'files': {n: {'sha256': sha[n], 'bytes': osp.getsize(osp.join(tmp, n))} for n in names}}
            with open(osp.join(tmp, MANIFEST), 'w') as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            _replace_dir(tmp, path, keep_as=prev_path)
            if best_path is not None:
                self.copy(path, best_path)
        dist.barrier()

    def copy(self, src: str, dst: str) -> None:
        """(rank 0) dst becomes a copy of the checkpoint folder src."""
        tmp = f'{dst}.tmp-{socket.gethostname()}-{os.getpid()}'
        if osp.exists(tmp):
            shutil.rmtree(tmp)
        _link_copy(src, tmp)
        _replace_dir(tmp, dst)

    # ------------------------------------------------------------------ read
    def verify(self, folder: str) -> Optional[str]:
        """None when every file matches the manifest, else what is wrong (a collective: each process hashes a share)."""
        problem = None
        try:
            with open(osp.join(folder, MANIFEST)) as f:
                files = json.load(f)['files']
            for name, rec in files.items():
                p = osp.join(folder, name)
                if not osp.isfile(p):
                    problem = problem or f'{name} is missing'
                elif osp.getsize(p) != rec['bytes']:
                    problem = problem or f'{name} has {osp.getsize(p)} bytes, the manifest says {rec["bytes"]}'
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem, files = f'no readable {MANIFEST} ({type(e).__name__}: {e}): the checkpoint was not finished', {}
        problem = dist.broadcast_object(problem)   # rank 0's reading decides for all
        if problem is not None:
            return problem
        sha = _hash_shared_out(folder, sorted(files))
        bad = [n for n in sorted(files) if sha[n] != files[n]['sha256']]
        return f'the sha256 of {", ".join(bad[:3])} does not match the manifest: damaged after it was written' if bad else None

    def load_first_good(self, paths: Sequence[str], validate: Optional[Callable[[Dict], None]] = None
                        ) -> Tuple[Optional[Dict], Optional[str], List[str]]:
        """As utils.ckpt.load_first_good for folders: (checkpoint without its tensors, its folder, the damaged ones before it).
        The tensors are read by `load_tensors`, once the models are built and sharded."""
        damaged, reasons = [], []
        for path in paths:
            if not osp.isdir(path):
                continue
            problem = self.verify(path)
            ckpt = None
            if problem is None:
                try:
                    ckpt = torch.load(osp.join(path, META), map_location='cpu', weights_only=True)
                    if validate is not None:
                        validate(ckpt)
                except Exception as e:   # noqa: BLE001 a file of another layout
                    problem = f'{type(e).__name__}: {str(e)[:300]}'
            if problem is not None:
                damaged.append(path)
                reasons.append(f'{path} ({problem})')
                logger.warning('checkpoint %s is damaged and is skipped: %s', path, problem)
                continue
            if damaged:
                logger.warning('resuming from the previous good checkpoint %s', path)
            ckpt['_dcp_folder'] = path
            return ckpt, path, damaged
        if damaged:
            raise CheckpointDamagedError(f'no readable checkpoint to resume from: {len(damaged)} damaged: ' + '; '.join(reasons)
                                         + '. Move these folders away to start from scratch, or use another --local_out_dir_path')
        return None, None, []

    @staticmethod
    def restore(task, ckpt: Dict, optimizers: Sequence[torch.optim.Optimizer] = (), skip: Sequence[str] = ()) -> None:
        """Read a checkpoint's tensors into the layout of the task's models as they are built now (this process's DTensor
        shards, or whole tensors on one process: DCP reshards) and load it into the task (engine.TrainingTask). The
        optimizers' lazy state is created first (DCP loads into existing tensors); paths starting with a prefix of `skip`
        (a frozen model whose weights come from elsewhere) are not read."""
        import torch.distributed.checkpoint as dcp
        for opt in optimizers:
            materialize_optimizer_state(opt)
        folder = ckpt.pop('_dcp_folder')
        wanted = {k for k in marked_keys(ckpt) if not k.startswith(tuple(skip))}
        # the live tensors, read in place, under the key of the task's state in a checkpoint (engine._Loop.checkpoint_state)
        target, _ = flatten_tensors({'trainer': task.state_dict()})
        target = {k: v for k, v in target.items() if k in wanted}
        unread = sorted(wanted - set(target))
        if unread:   # e.g. the EMA of a run resumed without --ema
            logger.info('%d tensors of %s have no place in this run and are not read, e.g. %s', len(unread), folder, unread[:3])
        with _single_process_quiet():
            dcp.load(target, checkpoint_id=folder)
        task.load_state_dict(fill_tensors(ckpt, target))

    # ------------------------------------------------------------------ interrupted writes
    @staticmethod
    def remove_stale(folder: str) -> List[str]:
        """(rank 0) Delete the temporary folders (<name>.dcp.tmp-<host>-<pid>, .old-) of a killed run."""
        removed = []
        host = socket.gethostname()
        for name in sorted(os.listdir(folder)) if osp.isdir(folder) else []:
            m = _STALE_RE.match(name)
            p = osp.join(folder, name)
            if m is None or not osp.isdir(p) or (m.group('host') == host and _process_alive(int(m.group('pid')))):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        return removed
