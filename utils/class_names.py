"""Class names: id k is the k-th of the sorted class folders, and the names travel with the weights.

Where names are recorded:
- a train.py / train_vae.py checkpoint: its 'class_names' entry (a list, id = position);
- a token folder: meta.json 'classes';
- a save_pretrained folder: classes.json (a JSON list);
- the published ImageNet models: the standard 1000 ImageNet class names (models/imagenet_classes.txt, in the order of
  the sorted synset folders n01440764 ... n15075141).
class_names_for(source) gives the names of whatever weights a script loads. The files themselves are read and written
by models/pretrained.py (the models' own API: var.class_names, models.pretrained.class_names).
"""
import difflib
import logging
import os.path as osp
import zipfile
from typing import List, Mapping, Optional, Sequence

from models.pretrained import CLASSES_NAME as CLASSES_JSON
from models.pretrained import class_names as _pretrained_class_names
from models.pretrained import imagenet_class_names, read_class_names, write_class_names
from utils.cli import UserError

__all__ = ['CLASSES_JSON', 'NULL_CLASS', 'ClassNameError', 'imagenet_class_names', 'write_classes_json', 'read_classes_json',
           'class_names_for', 'check_same_classes', 'split_classes', 'parse_class', 'parse_classes', 'describe_class', 'describe_classes', 'class_name_key']

logger = logging.getLogger(__name__)

NULL_CLASS = 'null'   # the label classifier-free guidance uses for "no class": id num_classes


class ClassNameError(UserError, ValueError):
    """A class given by a name or id that the model does not have; the message names the flag and the choices."""


def write_classes_json(folder: str, names: Sequence[str]) -> str:
    """Write folder/classes.json atomically; returns its path."""
    return write_class_names(folder, names)


def read_classes_json(folder: str) -> Optional[List[str]]:
    """The names of folder/classes.json, or None when the folder has none."""
    path = osp.join(folder, CLASSES_JSON)
    return read_class_names(path) if osp.isfile(path) else None


def _recorded(names, origin: str) -> Optional[List[str]]:
    if names is None:
        return None
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        return list(names)
    logger.warning("%s: its 'class_names' entry is not a list of names (%s), so its classes have no names", origin, type(names).__name__)
    return None


def _checkpoint_names(path: str) -> Optional[List[str]]:
    """'class_names' of a torch file that is a train.py / train_vae.py checkpoint (memory-mapped: the tensors are not read)."""
    if not zipfile.is_zipfile(path):
        return None
    import torch
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 not a torch file: it records no names; loading it as weights says why
        logger.info('%s: no class names read (%s)', path, type(e).__name__)
        return None
    return _recorded(obj.get('class_names'), path) if isinstance(obj, Mapping) else None


def class_names_for(source, num_classes: Optional[int] = None) -> Optional[List[str]]:
    """The class names (id = position) of the weights a script loads; None when they record none.

    source: a loaded train.py / train_vae.py checkpoint (its 'class_names'), or a path or name: such a checkpoint file, a
    save_pretrained folder or Hub repo (classes.json), a published model (var_d16.pth, a depth, FoundationVision/var: the
    1000 ImageNet names). With num_classes (the model's), names for more classes than it has are dropped with a warning.
    """
    if isinstance(source, Mapping):
        names, origin = _recorded(source.get('class_names'), 'the checkpoint'), 'the checkpoint'
    else:
        origin = str(source)
        names = _checkpoint_names(origin) if osp.isfile(origin) else None
        if names is None:   # the published models, save_pretrained folders and Hub repos: as the models' own API reads them
            names = _pretrained_class_names(source)
    if names is not None and num_classes is not None and len(names) > num_classes:
        logger.warning('%s: %d class names for a model of %d classes; they are not its classes, so its classes have no names',
                       origin, len(names), num_classes)
        return None
    return names


def parse_class(spec, num_classes: int, names: Optional[Sequence[str]] = None, flag: str = '--class_id',
                allow_null: bool = False) -> int:
    """An id ('980'), a name ('volcano', case and spaces as written or with '_'), or 'null' (with allow_null: the
    unconditional label num_classes) → the label. A bad one is a ClassNameError naming the flag and the fix."""
    s = str(spec).strip()
    if allow_null and s.lower() == NULL_CLASS:
        return num_classes
    try:
        k = int(s)
    except ValueError:
        k = None
    if k is not None:
        if not 0 <= k < num_classes:
            raise ClassNameError(f'{flag}={s}: the model has {num_classes} classes, ids 0 .. {num_classes - 1}'
                                 + (f", or '{NULL_CLASS}' for no class" if allow_null else ''))
        return k
    if not names:
        raise ClassNameError(f'{flag}={s!r}: these weights record no class names; give the class by id (0 .. {num_classes - 1})')
    key = class_name_key(s)
    matches = [i for i, n in enumerate(names[:num_classes]) if class_name_key(n) == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ClassNameError(f'{flag}={s!r} names {len(matches)} classes ({", ".join(map(str, matches))}): give the id')
    normed = [class_name_key(n) for n in names[:num_classes]]
    near = [i for i, n in enumerate(normed) if key in n] or [normed.index(n) for n in difflib.get_close_matches(key, normed, n=5)]
    close = [f'{i}: {names[i]}' for i in near[:8]]
    hint = f'; did you mean {", ".join(close)}?' if close else '; give an id, or a name as sample.py prints it'
    raise ClassNameError(f'{flag}={s!r} is not a class name of these weights{hint}')


def describe_class(k: int, names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None) -> str:
    """'980: volcano', '3' without names, 'null (unconditional)' for the label num_classes."""
    if num_classes is not None and k == num_classes:
        return f'{NULL_CLASS} (unconditional)'
    return f'{k}: {names[k]}' if names and 0 <= k < len(names) else str(k)


def check_same_classes(recorded, now: Sequence[str], ckpt_path: str, data_flag: str) -> None:
    """A resumed run's data must have the checkpoint's classes in the same order: label k must keep meaning class k.
    recorded: the checkpoint's 'class_names' (None: an older checkpoint, which records none, so nothing to compare)."""
    recorded = _recorded(recorded, ckpt_path)
    if recorded is None or list(recorded) == list(now):
        return
    k = next((i for i, (a, b) in enumerate(zip(recorded, now)) if a != b), min(len(recorded), len(now)))
    then = repr(recorded[k]) if k < len(recorded) else 'none'
    later = repr(now[k]) if k < len(now) else 'none'
    raise ClassNameError(f'{ckpt_path} was trained on other classes than {data_flag} has now ({len(recorded)} classes then, '
                         f'{len(now)} now; class {k}: {then} then, {later} now), so its labels would change meaning: resume '
                         f'with the data it was trained on, or start afresh with another --local_out_dir_path')


def split_classes(spec: str, flag: str = '--classes') -> List[str]:
    """The items of a comma-separated list of classes ('' → []); an empty item is a ClassNameError (checked before any
    weights are read: the number of items is known from the flag alone)."""
    if not spec.strip():
        return []
    items = [s.strip() for s in spec.split(',')]
    if not all(items):
        raise ClassNameError(f'{flag}={spec!r} has an empty item: separate ids or names by single commas (e.g. 980,volcano,null)')
    return items


def parse_classes(spec: str, num_classes: int, names: Optional[Sequence[str]] = None, flag: str = '--classes') -> Optional[List[int]]:
    """The labels of a comma-separated list of ids, names and 'null' (the unconditional label num_classes), in the order
    given; None for '' (every class 0 .. num_classes-1)."""
    items = split_classes(spec, flag)
    return [parse_class(s, num_classes, names, flag, allow_null=True) for s in items] if items else None


def describe_classes(labels: Sequence[int], names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None,
                     shown: int = 6) -> str:
    """A short line: '2 classes: 980: volcano, 207: golden retriever'; the first few and the last when there are many."""
    parts = [describe_class(k, names, num_classes) for k in labels]
    if len(parts) > shown:
        parts = parts[:shown - 1] + ['...', parts[-1]]
    return f'{len(labels)} class{"es" if len(labels) != 1 else ""}: {", ".join(parts)}'


def class_name_key(name: str) -> str:
    """The form in which two class names are compared: case, underscores and runs of spaces do not matter."""
    return ' '.join(name.replace('_', ' ').lower().split())
