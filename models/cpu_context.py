"""What the current CPU execution context allows the hand-picked CPU kernels (winograd.py, cpu_linear.py)."""
import torch

__all__ = ['cpu_autocast_enabled']


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on (it asks for bfloat16/float16 matmuls and convs, which these float32 kernels are not)."""
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:   # torch < 2.4
        return torch.is_autocast_cpu_enabled()
