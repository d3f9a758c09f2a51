"""Patch discriminator and hinge losses for the adversarial part of tokenizer training.

Letters: B batch, C channels, h/w side of the patch logit map.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['PatchDiscriminator', 'hinge_d_loss', 'hinge_g_loss', 'adaptive_weight']


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4×4 convs halving the side n_layers times, then two stride-1 convs to one logit per patch.

    GroupNorm instead of BatchNorm, so the logits of a sample never depend on the rest of the batch
    or on the number of processes.
    """

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = ch
        for i in range(1, n_layers + 1):
            c_next = ch * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, c_next // 4), c_next), nn.LeakyReLU(0.2)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        """Conv weights N(0, 0.02), norm weights N(1, 0.02), biases 0 (the DCGAN rule)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(x_B3HW)  # B, 1, h, w


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """‖∇ nll‖ / ‖∇ g_loss‖ at the decoder's last layer: balances the adversarial gradient against reconstruction."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
