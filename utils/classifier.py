"""A small CNN that labels pictures of the built-in dataset, to check what a generator draws."""
import logging
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

__all__ = ['SmallClassifier', 'train_classifier', 'predict']

logger = logging.getLogger(__name__)


class SmallClassifier(nn.Module):
    """Four stride-2 conv layers, global average pooling, a linear head. Input (B, 3, H, W) in [-1, 1]."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width, 4 * width)
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_B3HW).mean(dim=(2, 3)))  # B, num_classes


def _degrade(x_B3HW: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur and noise, so the classifier judges shape and colour rather than crisp edges."""
    B = x_B3HW.shape[0]
    k = int(torch.randint(0, 3, (1,), generator=g)) * 2 + 1   # box blur 1, 3 or 5
    if k > 1:
        x_B3HW = F.avg_pool2d(F.pad(x_B3HW, (k // 2,) * 4, mode='replicate'), k, stride=1)
    sigma = torch.rand(B, 1, 1, 1, generator=g) * 0.15
    return (x_B3HW + sigma * torch.randn(x_B3HW.shape, generator=g)).clamp(-1, 1)


def train_classifier(train_set: Dataset, val_set: Dataset, num_classes: int, epochs: int = 4, bs: int = 64, lr: float = 2e-3,
                     seed: int = 0) -> Tuple[SmallClassifier, float]:
    """Train on the real images (with random blur and noise); returns the model and its accuracy on the real val images."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loader = DataLoader(train_set, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed), drop_last=False)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(_degrade(x, g)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    correct = total = 0
    for x, y in DataLoader(val_set, batch_size=256):
        correct += (predict(model, x) == y).sum().item()
        total += len(y)
    return model, correct / max(total, 1)


@torch.no_grad()
def predict(model: SmallClassifier, x_B3HW: torch.Tensor) -> torch.Tensor:
    """Labels of images in [-1, 1]."""
    model.eval()
    return model(x_B3HW).argmax(dim=1)
