"""What the current CPU execution context allows the hand-picked CPU kernels (winograd.py, cpu_linear.py)."""
import torch

__all__ = ['cpu_autocast_enabled', 'compiling']


def cpu_autocast_enabled() -> bool:
    """Whether CPU autocast is on (it asks for bfloat16/float16 matmuls and convs, which these float32 kernels are not)."""
    try:
        return torch.is_autocast_enabled('cpu')
    except TypeError:   # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def compiling() -> bool:
    """Whether torch.compile is tracing (`--tfast`/`--vfast`): it lowers F.linear and F.conv2d itself, and cannot
    lower oneDNN's linear with a trainable weight."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:   # torch < 2.3
        return torch._dynamo.is_compiling()
