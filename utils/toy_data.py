"""The built-in dataset: coloured shapes whose class (shape × colour) is visible in the picture.

A deterministic generator writes an ImageFolder (train/ and val/, one folder per class) of PNGs with
varied backgrounds, positions and sizes. Nothing is downloaded; the same arguments give the same files.

    python -m utils.toy_data data/shapes --train_per_class 200 --val_per_class 20 --size 64
"""
import json
import math
import os
import os.path as osp
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from utils.flags import flag, parse_dataclass

__all__ = ['SHAPES', 'COLOURS', 'class_names', 'render', 'make_shapes_dataset']

SHAPES = ('circle', 'hbar', 'vbar', 'triangle', 'cross', 'square')  # the first three differ even when blurred (aspect ratio)
COLOURS: Dict[str, Tuple[int, int, int]] = {'red': (215, 35, 35), 'blue': (35, 70, 215), 'yellow': (235, 200, 20), 'green': (30, 160, 60)}


def class_names(n_shapes: int = 3, n_colours: int = 2) -> List[str]:
    if not (1 <= n_shapes <= len(SHAPES) and 1 <= n_colours <= len(COLOURS)):
        raise ValueError(f'n_shapes must be 1..{len(SHAPES)} and n_colours 1..{len(COLOURS)}')
    return [f'{c}_{s}' for s in SHAPES[:n_shapes] for c in list(COLOURS)[:n_colours]]


def _background(rng: random.Random, size: int, gradient: bool = True, bg_jitter: int = 95) -> Image.Image:
    """A light colour (245 minus up to bg_jitter per channel), far from every class colour; with `gradient`,
    a vertical or horizontal blend to a second one."""
    a = [rng.randint(245 - bg_jitter, 245) for _ in range(3)]
    if not gradient:
        return Image.new('RGB', (size, size), tuple(a))
    b = [min(255, max(120, v + rng.randint(-60, 60))) for v in a]
    img = Image.new('RGB', (size, size))
    px = img.load()
    horizontal = rng.random() < 0.5
    for y in range(size):
        for x in range(size):
            t = (x if horizontal else y) / max(size - 1, 1)
            px[x, y] = tuple(round(a[k] * (1 - t) + b[k] * t) for k in range(3))
    return img


def render(shape: str, colour: str, rng: random.Random, size: int = 64, gradient: bool = True,
           min_r: float = 0.2, max_r: float = 0.34, bg_jitter: int = 95) -> Image.Image:
    """One picture of `shape` in `colour` at a random position and size (radius min_r..max_r of the side)
    on a random light background."""
    img = _background(rng, size, gradient, bg_jitter)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(min_r, max_r) * size
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLOURS[colour])
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == 'square':
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape in ('hbar', 'vbar'):   # a bar three times as long as it is wide
        a, b = r, r / 3
        w, h = (a, b) if shape == 'hbar' else (b, a)
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    elif shape == 'triangle':
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(pts, fill=fill)
    elif shape == 'cross':
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')
    return img


def make_shapes_dataset(root: str, train_per_class: int = 200, val_per_class: int = 20, size: int = 64,
                        n_shapes: int = 3, n_colours: int = 2, seed: int = 0, gradient: bool = True,
                        min_r: float = 0.2, max_r: float = 0.34, bg_jitter: int = 95) -> List[str]:
    """Write root/{train,val}/<colour>_<shape>/NNNNN.png; returns the class names.

    A complete dataset with the same parameters is reused as it is (root/dataset.json records them).
    """
    params = dict(train_per_class=train_per_class, val_per_class=val_per_class, size=size, n_shapes=n_shapes,
                  n_colours=n_colours, seed=seed, gradient=gradient, min_r=min_r, max_r=max_r, bg_jitter=bg_jitter, version=1)
    stamp = osp.join(root, 'dataset.json')
    classes = class_names(n_shapes, n_colours)
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == params:
                return classes
    for split, n in (('train', train_per_class), ('val', val_per_class)):
        for ci, name in enumerate(classes):
            colour, shape = name.split('_')
            d = osp.join(root, split, name)
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                rng = random.Random(f'{seed}-{split}-{name}-{i}')
                path = osp.join(d, f'{i:05d}.png')
                tmp = path + '.tmp.png'
                render(shape, colour, rng, size, gradient, min_r, max_r, bg_jitter).save(tmp)
                os.replace(tmp, path)
    with open(stamp + '.tmp', 'w') as f:
        json.dump(params, f)
    os.replace(stamp + '.tmp', stamp)
    return classes


@dataclass
class ToyDataArgs:
    """Flags of `python -m utils.toy_data`."""
    root: str = flag(help='the folder to write: ROOT/train and ROOT/val, one folder per class (a complete one made with the same '
                          'flags is kept as it is)', positional=True)
    train_per_class: int = flag(200, 'training images per class', group='data')
    val_per_class: int = flag(20, 'validation images per class', group='data')
    size: int = flag(64, 'image side in pixels', group='data')
    n_shapes: int = flag(3, f'shapes, the first n of {", ".join(SHAPES)} (1 .. {len(SHAPES)})', group='data')
    n_colours: int = flag(2, f'colours, the first n of {", ".join(COLOURS)} (1 .. {len(COLOURS)}); classes: shapes x colours',
                          group='data')
    seed: int = flag(0, 'seed of every random choice: the same flags give the same files', group='data')
    gradient: int = flag(1, '1: gradient backgrounds, 0: solid ones', group='data')
    min_r: float = flag(0.2, "a shape's smallest radius, as a fraction of the side", group='data')
    max_r: float = flag(0.34, "a shape's largest radius, as a fraction of the side", group='data')
    bg_jitter: int = flag(95, 'how far (per channel) backgrounds vary below 245', group='data')


def main(argv: Sequence[str] = None) -> None:
    a = parse_dataclass(ToyDataArgs, argv, description=__doc__.splitlines()[0])
    classes = make_shapes_dataset(a.root, a.train_per_class, a.val_per_class, a.size, a.n_shapes, a.n_colours, a.seed,
                                  bool(a.gradient), a.min_r, a.max_r, a.bg_jitter)
    print(f'{len(classes)} classes in {a.root}: {", ".join(classes)}')


if __name__ == '__main__':
    main()
