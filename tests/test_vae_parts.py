"""Tokenizer-training parts: PSNR/SSIM, LPIPS with local weights (and its offline error), the patch discriminator."""
import math

import pytest
import torch

from models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from models.lpips import LPIPS, LPIPSWeightsUnavailable
from utils.metrics import gaussian_window, psnr, ssim


def test_psnr_exact_values():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1          # MSE 0.01 → 20 dB
    y[1] += 0.5          # MSE 0.25 → 6.02 dB
    assert psnr(y, x).tolist() == pytest.approx([20.0, 10 * math.log10(4)], abs=1e-4)


def naive_ssim(x, y, win=7, sigma=1.5):
    """SSIM by explicit loops over windows (float64), for a single-channel image."""
    g = gaussian_window(win, sigma)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    H, W = x.shape
    for i in range(H - win + 1):
        for j in range(W - win + 1):
            a, b = x[i:i + win, j:j + win].double(), y[i:i + win, j:j + win].double()
            ma, mb = (g * a).sum(), (g * b).sum()
            va, vb = (g * a * a).sum() - ma ** 2, (g * b * b).sum() - mb ** 2
            cov = (g * a * b).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return torch.stack(vals).mean().item()


def test_ssim_matches_a_direct_computation():
    torch.manual_seed(0)
    x = torch.rand(1, 1, 12, 10)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(y, x, win_size=7).item() == pytest.approx(naive_ssim(y[0, 0], x[0, 0], win=7), abs=1e-6)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noisier = (x + 0.4 * torch.randn_like(x)).clamp(0, 1)
    assert ssim(noisier, x).item() < ssim(y, x).item() < 1


def fake_lpips_weights(tmp_path):
    """A VGG16 state dict in torchvision's layout and LPIPS linear weights in the release's layout."""
    torch.manual_seed(0)
    net = LPIPS(load=False)
    vgg = {}
    bounds = (0, 4, 9, 16, 23, 30)
    for si, stage in enumerate(net.stages):
        for k, v in stage.state_dict().items():
            i, p = k.split('.')
            vgg[f'features.{bounds[si] + int(i)}.{p}'] = torch.randn_like(v) * 0.05
    vgg['classifier.0.weight'] = torch.zeros(2, 2)  # torchvision files carry the classifier too
    lin = {f'lin{i}.model.1.weight': torch.rand_like(l.weight) for i, l in enumerate(net.lins)}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    torch.save(lin, tmp_path / 'lpips_vgg.pth')
    return tmp_path / 'vgg16.pth', tmp_path / 'lpips_vgg.pth'


def test_lpips_from_local_weight_files(tmp_path):
    vgg_path, lin_path = fake_lpips_weights(tmp_path)
    lp = LPIPS(vgg_path=str(vgg_path), lin_path=str(lin_path))
    assert not any(p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = x + 0.3 * torch.randn_like(x)
    d_same, d_diff = lp(x, x), lp(x, y)
    assert d_same.shape == (2,) and d_same.abs().max() < 1e-6 and (d_diff > 0).all()
    x_req = x.clone().requires_grad_(True)
    lp(x_req, y).sum().backward()
    assert x_req.grad.abs().sum() > 0
    lp.train()
    assert not lp.training


def test_lpips_offline_error_names_the_files_and_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    with pytest.raises(LPIPSWeightsUnavailable) as e:
        LPIPS(vgg_path=str(tmp_path / 'missing_vgg.pth'))
    msg = str(e.value)
    assert 'missing_vgg.pth' in msg and 'download.pytorch.org/models/vgg16-397923af.pth' in msg and '--lpips_weight=0' in msg


def test_patch_discriminator_and_hinge_losses():
    torch.manual_seed(0)
    d = PatchDiscriminator(ch=16, n_layers=3)
    logits = d(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 6, 6)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == -2.0
    # one sample's logits do not depend on the rest of the batch
    a = d(torch.randn(1, 3, 64, 64).expand(3, -1, -1, -1).clone())
    assert torch.allclose(a[0], a[1])


def test_adaptive_weight_balances_gradient_norms():
    w = torch.nn.Parameter(torch.ones(3))
    nll = (2 * w).sum()          # gradient norm 2·√3
    g = (0.5 * w).sum()          # gradient norm 0.5·√3
    assert adaptive_weight(nll, g, w).item() == pytest.approx(4.0, rel=1e-3)
