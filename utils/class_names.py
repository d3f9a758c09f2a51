"""Class names: id k is the k-th of the sorted class folders, and the names travel with the weights.

Where names are recorded:
- a train.py / train_vae.py checkpoint: its 'class_names' entry (a list, id = position);
- a token folder: meta.json 'classes';
- a save_pretrained folder: classes.json (a JSON list);
- the published ImageNet models: the standard 1000 ImageNet class names (imagenet_classes.txt beside this file,
  in the order of the sorted synset folders n01440764 ... n15075141).
"""
import json
import os
import os.path as osp
from functools import lru_cache
from typing import List, Optional, Sequence

from utils.cli import UserError

__all__ = ['CLASSES_JSON', 'NULL_CLASS', 'ClassNameError', 'imagenet_class_names', 'write_classes_json', 'read_classes_json',
           'parse_class', 'describe_class']

CLASSES_JSON = 'classes.json'
NULL_CLASS = 'null'   # the label classifier-free guidance uses for "no class": id num_classes
_IMAGENET_FILE = osp.join(osp.dirname(osp.abspath(__file__)), 'imagenet_classes.txt')


class ClassNameError(UserError, ValueError):
    """A class given by a name or id that the model does not have; the message names the flag and the choices."""


@lru_cache(maxsize=1)
def _imagenet_names() -> tuple:
    with open(_IMAGENET_FILE, encoding='utf-8') as f:
        names = tuple(line.rstrip('\n') for line in f if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f'{_IMAGENET_FILE} holds {len(names)} names instead of ImageNet\'s 1000')
    return names


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet class names, id = position (980: 'volcano')."""
    return list(_imagenet_names())


def write_classes_json(folder: str, names: Sequence[str]) -> str:
    """Write folder/classes.json atomically; returns its path."""
    path = osp.join(folder, CLASSES_JSON)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(list(names), f, indent=0, ensure_ascii=False)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_classes_json(folder: str) -> Optional[List[str]]:
    """The names of folder/classes.json, or None when the folder has none."""
    path = osp.join(folder, CLASSES_JSON)
    if not osp.isfile(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            names = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{path} is not a JSON list of class names ({e}); delete it or write it again') from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f'{path} must hold a JSON list of class names (id = position)')
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
    key = _norm(s)
    matches = [i for i, n in enumerate(names[:num_classes]) if _norm(n) == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ClassNameError(f'{flag}={s!r} names {len(matches)} classes ({", ".join(map(str, matches))}): give the id')
    close = [f'{i}: {n}' for i, n in enumerate(names[:num_classes]) if key in _norm(n)][:8]
    hint = f'; did you mean {", ".join(close)}?' if close else '; give an id, or a name as sample.py prints it'
    raise ClassNameError(f'{flag}={s!r} is not a class name of these weights{hint}')


def describe_class(k: int, names: Optional[Sequence[str]] = None, num_classes: Optional[int] = None) -> str:
    """'980: volcano', '3' without names, 'null (unconditional)' for the label num_classes."""
    if num_classes is not None and k == num_classes:
        return f'{NULL_CLASS} (unconditional)'
    return f'{k}: {names[k]}' if names and 0 <= k < len(names) else str(k)


def _norm(name: str) -> str:
    return ' '.join(name.replace('_', ' ').lower().split())
