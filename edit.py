"""Zero-shot editing from the command line: in-paint, out-paint, or redraw a region as another class.

    python edit.py --image=dog.jpg --box=0.25,0.25,0.75,0.75 --mode=inpaint --out=dog_inpaint.png
    python edit.py --image=dog.jpg --box=0.2,0.2,0.8,0.8 --mode=outpaint --class_id=207 --out=dog_outpaint.png
    python edit.py --image=dog.jpg --mask=region.png --mode=class --class_id=tabby --out=dog_as_cat.png

The region is a box (y0, x0, y1, x1 as fractions of the height and width) or a mask image whose
white pixels mark it. `inpaint` and `class` regenerate the region and keep the rest; `outpaint` keeps
the region and regenerates the rest. The kept part of the result is exactly the tokenizer's
reconstruction of the input (token cells of the last scale, 16 px each).

The image is read as a viewer shows it (EXIF orientation applied, any bit depth or colour mode,
transparency over white), its short side resized to the model's resolution and the centre cropped;
a mask must have the image's size and goes through the same resize and crop, so the region edited
is the one marked (transparent mask pixels count as black: not marked).
"""
import logging
import math
import os
import os.path as osp
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

import dist
from models.helpers import EDIT_MODES, make_edit_mask
from utils.arg_util import FlagError, ModelFlags, flag, parse_dataclass, var_config_from_flags, vqvae_config_from_flags
from utils.class_names import NULL_CLASS, describe_class, parse_class
from utils.cli import UserError, run_main
from utils.cpu_speed import speed_up
from utils.data import normalize_01_into_pm1
from utils.imgs import (IMAGE_READ_ERRORS, centre_crop_square, load_rgb, resize_short_side, save_png_atomic, to_tensor01,
                        to_uint8_BHW3)
from utils.log import setup_logging
from utils.model_loading import build_from_weights, given_flags, read_weights

logger = logging.getLogger('edit')

BLACK = (0, 0, 0)


@dataclass
class EditArgs(ModelFlags):
    image: str = flag('', "the photo to edit (required); read as a viewer shows it, its short side resized to the model's "
                          'resolution and the centre cropped', group='data')
    out: str = flag('edit.png', 'the result, a .png; with --n > 1: <stem>_<k>.png', group='output')
    num_classes: int = flag(1000, "the model's class count, to check --class_id before the weights are read (a train.py "
                                  'checkpoint brings its own)', group='model')
    mode: str = flag('inpaint', 'inpaint: regenerate the region, keep the rest; outpaint: keep the region, regenerate the rest; '
                                'class: regenerate the region as --class_id', group='sampling')
    box: str = flag('', 'the region as y0,x0,y1,x1, fractions of the height and width (0 <= y0 < y1 <= 1, 0 <= x0 < x1 <= 1); '
                        'or --mask', group='data')
    mask: str = flag('', "the region as a mask image of the photo's size, white (> 127) where it is; or --box", group='data')
    class_id: str = flag('-1', "the class to sample with: an id (0 .. the model's classes - 1), a class name of the weights "
                               "(e.g. 'golden retriever', as sample.py prints them), or -1: no class (--mode=class needs one)",
                         group='sampling')
    n: int = flag(1, 'how many versions (>= 1), with the seeds seed, seed + 1, ...', group='sampling')
    cfg: float = flag(3.0, 'classifier-free guidance, from none at the first scale to cfg at the last (0: none)', group='sampling')
    top_k: int = flag(900, 'keep the k most likely tokens at each position (0 .. the vocabulary size; 0: no top-k filtering)',
                      group='sampling')
    top_p: float = flag(0.95, 'nucleus filtering: keep the most likely tokens that hold this share of the probability, in (0, 1] '
                              '(1: no nucleus filtering)', group='sampling')
    more_smooth: bool = flag(False, 'Gumbel-softmax smoothing of the drawn tokens: smoother images', group='sampling')
    seed: int = flag(0, 'seed of the first version (version k: seed + k), in [0, 2^63 - n]', group='sampling')
    save_recon: bool = flag(False, "also write the tokenizer's reconstruction of the input, <stem>_recon.png", group='output')
    cmd: str = field(default='', metadata={'derived': True})
    given: Tuple[str, ...] = field(default=(), metadata={'derived': True})   # the flags named on the command line


def check_flags(args: EditArgs) -> None:
    """Every flag, before any file is read or model built; class and token ranges as the flags give the model."""
    if not args.image:
        raise FlagError('--image is required: the photo to edit')
    if args.mode not in EDIT_MODES:
        raise FlagError(f'--mode={args.mode!r} must be one of {", ".join(EDIT_MODES)}')
    if bool(args.box) == bool(args.mask):
        raise FlagError('give the region as exactly one of --box=y0,x0,y1,x1 or --mask=PATH')
    if args.box:
        parse_box(args.box)
    if not str(args.class_id).strip():
        raise FlagError("--class_id='' must be an id, a class name, or -1 (no class)")
    k = class_number(args)
    if args.mode == 'class' and ((k is not None and k < 0) or str(args.class_id).strip().lower() == NULL_CLASS):
        raise FlagError('--mode=class needs the target --class_id')
    vqvae_config_from_flags(args), var_config_from_flags(args)   # the model flags' ranges
    check_sampling_ranges(args, args.num_classes, args.vocab_size, from_checkpoint=False)
    if not (0 < args.top_p <= 1):
        raise FlagError(f'--top_p={args.top_p:g} is outside (0, 1]: the share of probability mass to sample from (1: no nucleus filtering)')
    if not math.isfinite(args.cfg):
        raise FlagError(f'--cfg={args.cfg} must be a finite number (the guidance strength; 0: none)')
    if args.n < 1:
        raise FlagError(f'--n={args.n} must be >= 1 (the number of versions)')
    if args.seed < 0 or args.seed + args.n - 1 > 2 ** 63 - 1:
        raise FlagError(f'--seed={args.seed} must be in [0, 2^63 - n] (the versions use seed .. seed + n - 1)')
    if osp.splitext(args.out)[1].lower() != '.png':
        raise FlagError(f'--out={args.out!r} must end in .png (the results are written as PNG)')


def class_number(args: EditArgs) -> Optional[int]:
    """--class_id as an id (-1: no class), or None when it is a name (resolved against the weights' class names)."""
    try:
        return int(str(args.class_id).strip())
    except ValueError:
        return None


def resolve_class(args: EditArgs, num_classes: int, names: Optional[Sequence[str]]) -> int:
    """The label to sample with: --class_id's id, or the id of its name among the weights' class names; -1: no class."""
    k = class_number(args)
    if k is not None:
        return k
    if str(args.class_id).strip().lower() == NULL_CLASS:
        return -1
    return parse_class(args.class_id, num_classes, names, flag='--class_id')


def check_sampling_ranges(args: EditArgs, num_classes: int, V: int, from_checkpoint: bool) -> None:
    """--class_id (given as an id) and --top_k within the model's classes and vocabulary (V tokens), as the flags or the
    checkpoint give them.

    A train.py checkpoint brings its own class count and vocabulary: checked again once it is loaded.
    """
    classes_from = 'the checkpoint' if from_checkpoint else '--num_classes; pass the class count of a train.py checkpoint with more'
    tokens_from = 'the checkpoint' if from_checkpoint else '--vocab_size'
    k = class_number(args)
    if k is not None and not -1 <= k < num_classes:
        raise FlagError(f'--class_id={args.class_id} is outside [-1, {num_classes - 1}]: the model has {num_classes} classes '
                        f'({classes_from}); -1 samples without a class')
    if not 0 <= args.top_k <= V:
        raise FlagError(f'--top_k={args.top_k} is outside [0, {V}]: keep the k most likely of the {V} tokens ({tokens_from}); '
                        f'0 keeps all of them')


def parse_box(box: str) -> List[float]:
    """--box=y0,x0,y1,x1 as four fractions with 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1."""
    try:
        y0, x0, y1, x1 = (float(v) for v in box.split(','))
    except ValueError:
        raise FlagError(f'--box={box!r} must be four numbers y0,x0,y1,x1 in [0, 1]') from None
    if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
        raise FlagError(f'--box={box!r} must satisfy 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 (fractions of the height and width)')
    return [y0, x0, y1, x1]


def read_image(path: str) -> PIL.Image.Image:
    """The photo as 8-bit RGB at its own size (see utils.imgs.load_rgb)."""
    try:
        return load_rgb(path)
    except IMAGE_READ_ERRORS as e:   # missing, truncated, not an image, unsupported mode, too large
        raise UserError(f'cannot read the image {path}: {e}') from None


def read_mask(path: str, image_wh) -> PIL.Image.Image:
    """The mask as 8-bit grey (white = the region) at the image's size; transparent pixels are black."""
    try:
        mask = load_rgb(path, background=BLACK).convert('L')
    except IMAGE_READ_ERRORS as e:
        raise UserError(f'cannot read the mask image {path}: {e}') from None
    if mask.size != tuple(image_wh):
        raise UserError(f'the mask {path} is {mask.size[0]}x{mask.size[1]} pixels but the image is {image_wh[0]}x{image_wh[1]}: '
                        'draw the mask at the size of the image (as displayed, after EXIF rotation) so that it marks the same pixels')
    if np.asarray(mask).max() <= 127:
        raise UserError(f'the mask {path} marks no region: paint the region white (pixel values above 127) on black')
    return mask


def square_crop(img: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """The model's view of a photo (and of its mask): short side resized to `size` (Lanczos), centre crop size x size."""
    return centre_crop_square(resize_short_side(img, size), size)


def model_input(image: PIL.Image.Image, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: the photo as the model sees it."""
    return normalize_01_into_pm1(to_tensor01(square_crop(image, size)))[None]


def load_image(path: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1] of an image file."""
    return model_input(read_image(path), size)


def mask_region(mask: PIL.Image.Image, size: int, pn: int, path: str = 'the mask') -> torch.Tensor:
    """(pn, pn), 1 = the marked region: the mask through the image's resize and crop, then averaged over each token cell."""
    m_hw = np.asarray(square_crop(mask.convert('F'), size), dtype=np.float32) / 255
    region_hw = (F.interpolate(torch.from_numpy(m_hw)[None, None], size=(pn, pn), mode='area')[0, 0] > 0.5).float()
    if region_hw.sum() == 0:
        raise UserError(f'{path} marks no token cell: at most half of each {size // pn} px cell of the centre {size}x{size} crop '
                        f'the model sees is white; make the region larger or move it inside the crop')
    return region_hw


def keep_mask(args: EditArgs, mask: Optional[PIL.Image.Image], size: int, pn: int) -> torch.Tensor:
    """The edit mask (pn, pn) of the model: 1 = keep the input's tokens."""
    if mask is None:
        try:
            return make_edit_mask(parse_box(args.box), args.mode, (pn, pn))
        except ValueError as e:
            raise FlagError(f'--box: {e}') from None
    region_hw = mask_region(mask, size, pn, args.mask)
    return region_hw if args.mode == 'outpaint' else 1.0 - region_hw


def main(args: EditArgs) -> List[str]:
    # flags, then the (small) input files, then the model
    check_flags(args)
    image = read_image(args.image)
    mask = read_mask(args.mask, image.size) if args.mask else None
    device = dist.initialize()
    setup_logging(0)
    weights = read_weights(args, args.given)
    check_sampling_ranges(args, weights.var.num_classes, weights.vqvae.V, from_checkpoint=True)
    label = resolve_class(args, weights.var.num_classes, weights.class_names)   # a bad name stops before the model is built
    vae, var = build_from_weights(device, args, weights)
    speed_up(vae, var)   # cpu_kernels, where present
    size, pn = vae.img_size, var.patch_nums[-1]
    keep_hw = keep_mask(args, mask, size, pn).to(device)
    img = model_input(image, size).to(device)

    # tokenise, sample the region, paste the reconstruction over the kept cells
    with torch.inference_mode():
        idx_Bl = vae.img_to_idxBl(img)
        recon = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).add(1).mul(0.5)   # 1, 3, H, W in [0, 1]
        idx_Bl = [t.expand(args.n, -1) for t in idx_Bl]
        gen = var.autoregressive_infer_cfg(B=args.n, label_B=label, g_seed=[args.seed + k for k in range(args.n)],
                                           cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                                           input_img_tokens=idx_Bl, edit_mask=keep_hw)
    keep_px = F.interpolate(keep_hw[None, None], size=gen.shape[-2:], mode='nearest')
    result = keep_px * recon + (1 - keep_px) * gen

    # write
    stem, ext = osp.splitext(args.out)
    paths = [args.out] if args.n == 1 else [f'{stem}_{k}{ext}' for k in range(args.n)]
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    for path, arr in zip(paths, to_uint8_BHW3(result)):
        save_png_atomic(arr, path)
    if args.save_recon:
        save_png_atomic(to_uint8_BHW3(recon)[0], f'{stem}_recon.png')
    what = 'no class' if label < 0 else f'class {describe_class(label, weights.class_names)}'
    logger.info('%s of %s (%s, %s): %s', args.mode, args.image, args.box or args.mask, what, ', '.join(paths))
    return paths


def parse_edit_args(argv: Optional[List[str]] = None) -> EditArgs:
    import sys
    args = parse_dataclass(EditArgs, argv, description=__doc__.splitlines()[0])
    args.given = given_flags(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == '__main__':
    run_main(lambda: main(parse_edit_args()))
