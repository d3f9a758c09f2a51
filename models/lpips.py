"""LPIPS perceptual distance on VGG16 features (Zhang et al., 2018), for tokenizer training.

Weights: torchvision's VGG16 ImageNet weights and the LPIPS v0.1 linear calibration weights, each
from a local file or the usual download (torch hub cache); offline the error says what to fetch.
Letters: B batch, C channels, h/w feature side.
"""
from typing import List, Optional

import torch
import torch.nn as nn

__all__ = ['LPIPS', 'VGG16_URL', 'LPIPS_LIN_URL', 'LPIPSWeightsUnavailable']

VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
LPIPS_LIN_URL = 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth'

# VGG16 `features` indices ending each of the five compared stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_STAGE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPSWeightsUnavailable(FileNotFoundError):
    """The VGG16 or LPIPS weights can be neither read nor downloaded."""


def _vgg16_features() -> nn.Sequential:
    layers: List[nn.Module] = []
    c_in = 3
    for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
        if v == 'M':
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            c_in = v
    return nn.Sequential(*layers)


def _load(path: Optional[str], url: str, what: str) -> dict:
    try:
        if path:
            return torch.load(path, map_location='cpu', weights_only=True)
        return torch.hub.load_state_dict_from_url(url, map_location='cpu', progress=False, weights_only=True)
    except Exception as e:
        raise LPIPSWeightsUnavailable(
            f'the {what} for the perceptual loss could not be loaded from {path or url} ({type(e).__name__}: {str(e)[:160]}). '
            f'Download {url} on a connected machine and pass its path (--lpips_vgg for the VGG16 weights, --lpips_lin for the LPIPS '
            f'weights), or train without the perceptual loss: --lpips_weight=0') from None


class LPIPS(nn.Module):
    """d(x, y) = Σ_stages mean_hw ‖w_s ⊙ (f̂_s(x) − f̂_s(y))‖², f̂ = VGG features normalised over channels.

    Inputs in [-1, 1], (B, 3, H, W); returns (B,). The network is frozen.
    """

    def __init__(self, vgg_path: Optional[str] = None, lin_path: Optional[str] = None, load: bool = True):
        super().__init__()
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)
        features = _vgg16_features()
        bounds = (0,) + _STAGE_ENDS
        self.stages = nn.ModuleList(nn.Sequential(*features[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in _CHANNELS)
        if load:
            self.load_weights(vgg_path, lin_path)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def load_weights(self, vgg_path: Optional[str], lin_path: Optional[str]) -> None:
        vgg = _load(vgg_path, VGG16_URL, 'VGG16 ImageNet weights')
        vgg = {k[len('features.'):]: v for k, v in vgg.items() if k.startswith('features.')} or vgg
        flat = {}
        bounds = (0,) + _STAGE_ENDS
        for si, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            for i in range(a, b):
                for p in ('weight', 'bias'):
                    if f'{i}.{p}' in vgg:
                        flat[f'{si}.{i - a}.{p}'] = vgg[f'{i}.{p}']
        self.stages.load_state_dict(flat, strict=True)
        lin = _load(lin_path, LPIPS_LIN_URL, 'LPIPS v0.1 linear weights')
        # the LPIPS release names them lin{i}.model.1.weight (after a dropout); ours are lins.{i}.weight
        mapped = {}
        for k, v in lin.items():
            for i in range(len(_CHANNELS)):
                if k in (f'lin{i}.model.1.weight', f'lins.{i}.weight', f'{i}.weight'):
                    mapped[f'{i}.weight'] = v
        self.lins.load_state_dict(mapped, strict=True)

    def _features(self, x_B3HW: torch.Tensor) -> List[torch.Tensor]:
        h = (x_B3HW - self.shift) / self.scale
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        fx, fy = self._features(x_B3HW.float()), self._features(y_B3HW.float())
        d_B = 0
        for lin, a_BChw, b_BChw in zip(self.lins, fx, fy):
            a_BChw = a_BChw / (a_BChw.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b_BChw = b_BChw / (b_BChw.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d_B = d_B + lin((a_BChw - b_BChw).square()).mean(dim=(1, 2, 3))
        return d_B

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen
