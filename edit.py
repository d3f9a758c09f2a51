"""Zero-shot editing from the command line: in-paint, out-paint, or redraw a region as another class.

    python edit.py --image=dog.jpg --box=0.25,0.25,0.75,0.75 --mode=inpaint --out=dog_inpaint.png
    python edit.py --image=dog.jpg --box=0.2,0.2,0.8,0.8 --mode=outpaint --class_id=207 --out=dog_outpaint.png
    python edit.py --image=dog.jpg --mask=region.png --mode=class --class_id=281 --out=dog_as_cat.png

The region is a box (y0, x0, y1, x1 as fractions of the height and width) or a mask image whose
white pixels mark it. `inpaint` and `class` regenerate the region and keep the rest; `outpaint` keeps
the region and regenerates the rest. The kept part of the result is exactly the tokenizer's
reconstruction of the input (token cells of the last scale, 16 px each).
"""
import logging
import os.path as osp
from dataclasses import dataclass, field
from typing import List, Optional

import PIL.Image
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import dist
from models.helpers import EDIT_MODES, make_edit_mask
from utils.arg_util import FlagError, ModelFlags, parse_dataclass
from utils.cli import UserError, run_main
from utils.data import normalize_01_into_pm1
from utils.imgs import save_png_atomic, to_uint8_BHW3
from utils.log import setup_logging
from utils.model_loading import load_for_sampling

logger = logging.getLogger('edit')


@dataclass
class EditArgs(ModelFlags):
    image: str = ''
    out: str = 'edit.png'                # with --n > 1: <stem>_<k>.png
    mode: str = 'inpaint'                # inpaint | outpaint | class
    box: str = ''                        # y0,x0,y1,x1 in [0, 1]
    mask: str = ''                       # a mask image instead of --box: white = the region
    class_id: int = -1                   # the label to sample with; -1: no class (required for --mode=class)
    n: int = 1                           # how many versions (seeds seed, seed+1, ...)
    cfg: float = 3.0
    top_k: int = 900
    top_p: float = 0.95
    more_smooth: bool = False
    seed: int = 0
    save_recon: bool = False             # also write the tokenizer's reconstruction of the input (<stem>_recon.png)
    cmd: str = field(default='', metadata={'derived': True})


def load_image(path: str, size: int) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: short side resized to `size` (Lanczos), centre crop."""
    try:
        img = PIL.Image.open(path).convert('RGB')
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read the image {path}: {e}') from None
    img = TF.center_crop(TF.resize(img, size, interpolation=InterpolationMode.LANCZOS), [size, size])
    return normalize_01_into_pm1(TF.to_tensor(img))[None]


def region_mask(args: EditArgs, pn: int) -> torch.Tensor:
    """The edit mask (pn, pn) of the model: 1 = keep the input's tokens."""
    if bool(args.box) == bool(args.mask):
        raise FlagError('give the region as exactly one of --box=y0,x0,y1,x1 or --mask=PATH')
    if args.box:
        try:
            box = [float(v) for v in args.box.split(',')]
        except ValueError:
            raise FlagError(f'--box={args.box!r} must be four numbers y0,x0,y1,x1 in [0, 1]') from None
        try:
            return make_edit_mask(box, args.mode, (pn, pn))
        except ValueError as e:
            raise FlagError(f'--box: {e}') from None
    try:
        m = TF.to_tensor(PIL.Image.open(args.mask).convert('L'))[None]   # 1, 1, H, W in [0, 1]
    except (OSError, ValueError) as e:
        raise UserError(f'cannot read the mask image {args.mask}: {e}') from None
    region = (F.interpolate(m, size=(pn, pn), mode='area')[0, 0] > 0.5).float()
    if region.sum() == 0:
        raise UserError(f'the mask {args.mask} marks no region (white pixels) at the {pn}x{pn} token resolution')
    return region if args.mode == 'outpaint' else 1.0 - region


def main(args: EditArgs) -> List[str]:
    device = dist.initialize()
    setup_logging(0)
    if args.mode not in EDIT_MODES:
        raise FlagError(f'--mode={args.mode!r} must be one of {", ".join(EDIT_MODES)}')
    if args.mode == 'class' and args.class_id < 0:
        raise FlagError('--mode=class needs the target --class_id')
    if not args.image:
        raise FlagError('--image is required')
    vae, var, kw = load_for_sampling(device, args)
    pn = var.patch_nums[-1]
    img = load_image(args.image, vae.img_size).to(device)
    keep_hw = region_mask(args, pn).to(device)
    with torch.inference_mode():
        idx_Bl = vae.img_to_idxBl(img)
        recon = vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True).add(1).mul(0.5)   # 1, 3, H, W in [0, 1]
        idx_Bl = [t.expand(args.n, -1) for t in idx_Bl]
        gen = var.autoregressive_infer_cfg(B=args.n, label_B=args.class_id, g_seed=[args.seed + k for k in range(args.n)],
                                           cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth,
                                           input_img_tokens=idx_Bl, edit_mask=keep_hw)
    # the kept token cells show the reconstruction exactly; the others the generated image
    keep_px = F.interpolate(keep_hw[None, None], size=gen.shape[-2:], mode='nearest')
    result = keep_px * recon + (1 - keep_px) * gen
    stem, ext = osp.splitext(args.out)
    paths = [args.out] if args.n == 1 else [f'{stem}_{k}{ext or ".png"}' for k in range(args.n)]
    for path, arr in zip(paths, to_uint8_BHW3(result)):
        save_png_atomic(arr, path)
    if args.save_recon:
        save_png_atomic(to_uint8_BHW3(recon)[0], f'{stem}_recon.png')
    logger.info('%s of %s (%s, class %s): %s', args.mode, args.image, args.box or args.mask, args.class_id, ', '.join(paths))
    return paths


def parse_edit_args(argv: Optional[List[str]] = None) -> EditArgs:
    return parse_dataclass(EditArgs, argv, description=__doc__.splitlines()[0])


if __name__ == '__main__':
    run_main(lambda: main(parse_edit_args()))
