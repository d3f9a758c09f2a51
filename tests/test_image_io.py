"""Every image file reads as the RGB a viewer shows, the same way in the data sets and in edit.py (utils.imgs.load_rgb)."""
import numpy as np
import pytest
import torch
from PIL import Image

SIZE = 8
RNG = np.random.RandomState(0)


def blend_over_white(rgb_hw3: np.ndarray, alpha_hw: np.ndarray) -> np.ndarray:
    a = alpha_hw[..., None].astype(np.float64) / 255
    return np.round(rgb_hw3 * a + 255 * (1 - a)).astype(np.uint8)


def grey3(g_hw: np.ndarray) -> np.ndarray:
    return np.repeat(g_hw[..., None], 3, axis=-1).astype(np.uint8)


def write_case(case: str, d):
    """(path of a file PIL wrote, expected (SIZE, SIZE, 3) uint8 RGB, tolerance in uint8 levels)."""
    rgb = RNG.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    g = RNG.randint(0, 256, (SIZE, SIZE)).astype(np.uint8)
    alpha = RNG.choice([0, 255, 128, 40], (SIZE, SIZE)).astype(np.uint8)
    if case == 'RGB':
        img, exp = Image.fromarray(rgb), rgb
    elif case == 'L':
        img, exp = Image.fromarray(g), grey3(g)
    elif case == '1':
        b = g > 127
        img, exp = Image.fromarray(b), grey3(b * 255)
    elif case in ('P', 'P_transparency'):
        palette = RNG.randint(0, 256, (256, 3)).astype(np.uint8)
        palette[0] = (10, 20, 30)                  # the transparent entry has a colour that is not white
        idx = RNG.randint(0, 6, (SIZE, SIZE)).astype(np.uint8)
        img = Image.frombytes('P', (SIZE, SIZE), idx.tobytes())
        img.putpalette(palette.ravel().tolist())
        exp = palette[idx]
        if case == 'P_transparency':
            img.info['transparency'] = 0
            exp = np.where((idx == 0)[..., None], 255, exp).astype(np.uint8)
    elif case == 'LA':
        img, exp = Image.fromarray(np.stack([g, alpha], -1)), blend_over_white(grey3(g), alpha)
    elif case == 'RGBA':
        img, exp = Image.fromarray(np.concatenate([rgb, alpha[..., None]], -1)), blend_over_white(rgb, alpha)
    elif case == 'L_colour_key':                    # a grey PNG whose tRNS chunk makes one grey value transparent
        g[0, :] = 7
        img, exp = Image.fromarray(g), np.where((g == 7)[..., None], 255, grey3(g)).astype(np.uint8)
        img.info['transparency'] = 7
    elif case == 'CMYK':
        cmyk = RNG.randint(0, 256, (SIZE, SIZE, 4)).astype(np.uint8)
        img = Image.frombytes('CMYK', (SIZE, SIZE), cmyk.tobytes())
        c = cmyk.astype(np.float64)
        exp = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)
        return save(img, d / 'cmyk.tif'), exp, 1
    elif case in ('I;16', 'I;16B', 'I'):
        v = RNG.randint(0, 65536, (SIZE, SIZE))
        v[0, 0], v[0, 1] = 0, 65535
        exp = grey3(np.round(v / 257))
        if case == 'I;16':
            return save(Image.fromarray(v.astype(np.uint16)), d / 'g16.png'), exp, 0
        if case == 'I;16B':
            img = Image.frombytes('I;16B', (SIZE, SIZE), v.astype('>u2').tobytes())
            return save(img, d / 'g16b.tif'), exp, 0
        return save(Image.fromarray(v.astype(np.int32)), d / 'i32.tif'), exp, 0
    elif case == 'YCbCr':                           # Cb = Cr = 128: grey
        ycc = np.stack([g, np.full_like(g, 128), np.full_like(g, 128)], -1)
        return save(Image.frombytes('YCbCr', (SIZE, SIZE), ycc.tobytes()), d / 'ycc.tif'), grey3(g), 1
    elif case == 'LAB':                             # columns of black and white (a = b = 0; PIL stores a, b as signed bytes)
        lab = np.zeros((SIZE, SIZE, 3), np.uint8)
        lab[..., 0] = np.array([0, 255, 0, 255, 0, 255, 0, 255], np.uint8)[None]
        exp = grey3(np.broadcast_to(lab[..., 0], (SIZE, SIZE)))
        return save(Image.frombytes('LAB', (SIZE, SIZE), lab.tobytes()), d / 'lab.tif'), exp, 3
    elif case in ('exif_rotate_90', 'exif_rotate_180', 'exif_mirror'):
        orientation, exp = {'exif_rotate_90': (6, np.rot90(rgb, -1)), 'exif_rotate_180': (3, rgb[::-1, ::-1]),
                            'exif_mirror': (2, rgb[:, ::-1])}[case]
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = d / f'{case}.png'
        Image.fromarray(rgb).save(path, exif=exif)
        return path, np.ascontiguousarray(exp), 0
    else:
        raise KeyError(case)
    return save(img, d / f'{case}.png'), exp, 0


def save(img, path):
    img.save(path)
    return path


CASES = ['RGB', 'L', '1', 'P', 'P_transparency', 'LA', 'RGBA', 'L_colour_key', 'CMYK', 'I;16', 'I;16B', 'I', 'YCbCr', 'LAB',
         'exif_rotate_90', 'exif_rotate_180', 'exif_mirror']


@pytest.mark.parametrize('case', CASES)
def test_every_mode_reads_as_its_rgb_in_the_data_set_and_edit(tmp_path, case):
    import edit
    from utils.data import ImageFolderDataset
    path, exp_hw3, tol = write_case(case, tmp_path)
    expected_3hw = torch.from_numpy(exp_hw3).permute(2, 0, 1).double() / 255 * 2 - 1
    ds = ImageFolderDataset([(str(path), 0)], final_reso=SIZE, mid_reso=1.0, train=False)
    img_3hw, label = ds[0]
    assert label == 0 and int(ds.n_skipped) == 0
    for got, where in ((img_3hw, 'data set'), (edit.load_image(str(path), SIZE)[0], 'edit.py')):
        diff = (got.double() - expected_3hw).abs().max().item() * 255 / 2
        assert diff <= tol + 1e-3, f'{case} in the {where}: off by {diff:.1f} levels'
    from utils.imgs import load_rgb
    img = load_rgb(str(path))
    assert img.mode == 'RGB' and np.abs(np.asarray(img).astype(int) - exp_hw3).max() <= tol


@pytest.mark.parametrize('case, message', [
    ('F', 'mode F'),
    ('I_negative', 'outside the 16-bit range'),
    ('not_an_image', 'cannot identify image file'),
])
def test_images_without_a_defined_rgb_are_refused_not_guessed(tmp_path, case, message):
    import edit
    from utils.cli import UserError
    from utils.data import ImageFolderDataset
    from utils.imgs import load_rgb
    path = tmp_path / f'{case}.tif'
    if case == 'F':
        Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32)).save(path)
    elif case == 'I_negative':
        Image.fromarray(np.full((SIZE, SIZE), -3, np.int32)).save(path)
    else:
        path.write_bytes(b'not an image')
    with pytest.raises((ValueError, OSError), match=message):
        load_rgb(str(path))
    with pytest.raises(UserError, match=f'cannot read the image {path}: .*{message}'):
        edit.load_image(str(path), SIZE)
    good = tmp_path / 'good.png'
    Image.new('RGB', (SIZE, SIZE), (0, 0, 255)).save(good)
    ds = ImageFolderDataset([(str(path), 0), (str(good), 1)], final_reso=SIZE, mid_reso=1.0, train=False)
    img_3hw, label = ds[0]                          # skipped with a warning, counted
    assert label == 1 and int(ds.n_skipped) == 1 and img_3hw[2].min() == 1


@pytest.mark.parametrize('w, h', [(64, 48), (48, 64), (37, 91), (90, 90), (73, 71), (300, 41)])
def test_the_transforms_are_torchvisions_pixel_for_pixel(w, h):
    """utils.imgs' resize, crops, flip and to-tensor give torchvision.transforms.functional's results exactly (the data
    sets and edit.py use them instead of importing torchvision at every start)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    from utils.imgs import centre_crop_square, crop_square, hflip, resize_short_side, to_tensor01
    rng = np.random.default_rng(w * 1000 + h)
    for mode, shape in (('RGB', (h, w, 3)), ('L', (h, w))):
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        for size in (32, 41, min(w, h)):
            ours, theirs = resize_short_side(img, size), TF.resize(img, size, interpolation=InterpolationMode.LANCZOS)
            assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs)), (mode, size)
            r = min(ours.size) - 3
            assert np.array_equal(np.asarray(centre_crop_square(ours, r)), np.asarray(TF.center_crop(theirs, [r, r])))
            assert np.array_equal(np.asarray(crop_square(ours, 2, 1, r)), np.asarray(TF.crop(theirs, 2, 1, r, r)))
        assert np.array_equal(np.asarray(hflip(img)), np.asarray(TF.hflip(img)))
        assert torch.equal(to_tensor01(img), TF.to_tensor(img))
