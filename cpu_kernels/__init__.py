"""CPU speed for the models of models/, as a converter: `cpu_kernels.convert(model)` swaps the tokenizer's and the
transformer's modules for subclasses with the same parameters and state-dict keys whose forwards call this package's
kernels, each beside the plain path it replaces. Without it (or without this package) the models are exact and
complete; with it they compute the same up to float rounding.

    convert(module)          in place: every VQVAE and VAR inside `module` (convert.py; the classes: tokenizer.py,
                             transformer.py)
    fast_paths(enabled)      `with fast_paths(False):` runs the converted modules on their plain paths, process-wide
                             (switch.py); set_fast_paths(enabled) sets it
    describe_choices()       one line per kernel: what runs on this CPU and why (choices.py; logged at the first convert)

The kernels: oneDNN linear and the training MLP and AdaLN that keep fewer activations (matmul.py, adaln.py); the
tokenizer's batch-invariant, Winograd, by-taps and polyphase convs, memory layout, images in groups and heap
(conv.py, winograd.py, c_winograd.py, narrow_conv.py, upsample.py, memory.py, heap.py); CPU teacher-forcing attention
and the C attention kernel (block_causal.py, attention.py, c_attention.py). The C sources (csrc/) are compiled on first
use (native.py). Which kernels a CPU takes is one table of rules (cpu_rules.py: vendor, ISA flags, cores; never timing);
OpenMP's idle spin, which libgomp reads before this package can act, is described in threads.py.
"""
from .choices import describe_choices, log_choices_once
from .convert import convert
from .switch import fast_paths, fast_paths_enabled, set_fast_paths

__all__ = ['convert', 'fast_paths', 'set_fast_paths', 'fast_paths_enabled', 'describe_choices', 'log_choices_once']
