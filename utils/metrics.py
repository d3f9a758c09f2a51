"""Reconstruction metrics of the tokenizer: PSNR, SSIM and codebook usage per scale."""

import torch
import torch.nn.functional as F

__all__ = ['psnr', 'ssim', 'gaussian_window']


def psnr(x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per image, 10·log10(range² / MSE), images in [0, data_range]; (B,)."""
    mse_B = (x_B3HW.float() - y_B3HW.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse_B.clamp_min(1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim(x_B3HW: torch.Tensor, y_B3HW: torch.Tensor, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image, the mean SSIM (Wang et al., 2004) over channels and valid window positions; (B,).

    Gaussian window 11×11, σ 1.5, K1 = 0.01, K2 = 0.03; windows never leave the image, so images
    smaller than the window use a window of the image's size.
    """
    x, y = x_B3HW.double(), y_B3HW.double()
    C = x.shape[1]
    win_size = min(win_size, x.shape[-1], x.shape[-2])
    w = gaussian_window(win_size, sigma).to(x.device)[None, None].expand(C, 1, win_size, win_size)

    def filt(t):
        return F.conv2d(t, w, groups=C)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()
