"""Regional compilation of the VAR transformer for training: each block compiled on its own, the whole model not.

`compile_blocks(var)` calls `block.compile(fullgraph=True, dynamic=False, mode=mode)` on every `var.blocks[i]` (an
AdaLNSelfAttn), in place, as torchtitan and diffusers compile their transformer blocks:

- one graph serves every block of the same structure: the blocks share their forward's code, and their parameters are
  inputs of the graph, not constants (and DropPath reads its rate from a tensor under compile, models/helpers.py), so
  a d16 model compiles two graphs per input shape (block 0, which has no drop path, and the 15 others), not sixteen;
- fullgraph=True: a graph break is an error, not a silent fall back to Python between graph pieces. Under
  torch.compile the kernels of cpu_kernels take PyTorch's plain ops (F.linear, the layer norm, SDPA), which the
  compiler fuses itself; the oneDNN, C and flash-attn paths and their autograd functions run only eagerly;
- dynamic=False: static shapes. Each (sequence length, batch size, autograd on or off) is a graph of its own; progressive
  training's stages feed other sequence lengths, validation another batch without autograd. torch._dynamo's per-function
  recompile limit (8) is raised to what those take (`recompile_limit_for`), never lowered: with fullgraph=True reaching
  it would stop training;
- the state dict keeps its keys (nn.Module.compile keeps the module as it is; no '_orig_mod.' prefix), so checkpoints
  load into a plain model and a plain model's checkpoints into this one.

Teacher forcing (training, validation) runs the compiled blocks. KV-cached sampling (the tensorboard grids, sample.py
on a trained model) runs them eagerly: each of its 10 scales is another query and key length, the cache is module
state that the step appends to, and models/sampling.py has its own way to make that loop fast (CUDA graphs). A block
that caches keys and values (`attn.caching`) therefore calls its plain forward; nothing is compiled for it.

On CUDA, where models.attention offers FlexAttention ('flex' in BACKENDS), the compiled blocks attend through it: the
scales' block-causal mask as a block mask, which the compiler turns into one fused kernel that skips the masked-out
blocks, instead of SDPA reading a dense L x L bias. On the CPU the blocks attend by groups of scales with PyTorch's
ops. One log line says which.

This differs from train.py --tfast (torch.compile of the whole model with a mode): compile time grows with the
number of distinct blocks, not with depth, and the code around the blocks (embeddings, head, loss) stays eager.
"""
import logging
from typing import Callable, Optional, Set

import torch
import torch.nn as nn

from models import attention as attention_backends

__all__ = ['compile_blocks', 'recompile_limit_for', 'compiled_blocks']

logger = logging.getLogger(__name__)

# graphs per block structure and sequence length: with and without autograd (training, validation), each at two
# batch sizes (the training batch; the validation batch or an epoch's last, smaller one)
_GRAPHS_PER_LENGTH = 2 * 2


class _TeacherForcingOnly:
    """A compiled block's call: the compiled forward, except while the block caches keys and values (sampling), when
    it is the block's plain forward. A copy of the block (copy.deepcopy) gets none, i.e. runs eagerly: the compiled
    function belongs to the original block."""

    def __init__(self, block: nn.Module, compiled: Callable):
        self.block, self.compiled = block, compiled

    def __call__(self, *args, **kwargs):
        if self.block.attn.caching:
            return self.block._call_impl(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def __deepcopy__(self, memo):
        return None


def _structure(block: nn.Module) -> tuple:
    """What tells blocks that need graphs of their own apart: the types of their submodules, in order."""
    return tuple(type(m) for m in block.modules())


def recompile_limit_for(var: nn.Module) -> int:
    """Compiled graphs the blocks' shared forward may need: distinct block structures x scales (progressive training's
    sequence lengths) x _GRAPHS_PER_LENGTH."""
    structures: Set[tuple] = {_structure(b) for b in var.blocks}
    return len(structures) * len(var.patch_nums) * _GRAPHS_PER_LENGTH


def _raise_recompile_limits(needed: int) -> int:
    """torch._dynamo's per-function and accumulated recompile limits raised to `needed` (never lowered); the limit now."""
    config = torch._dynamo.config
    per_function = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'   # named so from 2.6
    accumulated = 'accumulated_recompile_limit' if hasattr(config, 'accumulated_recompile_limit') else 'accumulated_cache_size_limit'
    setattr(config, per_function, max(getattr(config, per_function), needed))
    setattr(config, accumulated, max(getattr(config, accumulated), needed))
    return getattr(config, per_function)


def _training_attention(var: nn.Module, device: torch.device) -> str:
    """Switch the block-causal attention to FlexAttention where it helps and exists; what the compiled blocks use, and why."""
    if var.attn_backend == 'math':
        return "the plain matmul-softmax with the dense block-causal mask (attention backend 'math', as chosen)"
    if device.type == 'cuda':
        if 'flex' in attention_backends.BACKENDS:
            usable, why_not = attention_backends.backend_status('flex')
            if usable:
                var.set_attn_backend('flex')
                return ("FlexAttention (attention backend 'flex'): the scales' block-causal mask as a block mask, compiled "
                        'into the blocks, instead of SDPA over a dense L x L bias')
            return f"SDPA with the dense block-causal bias: FlexAttention is not usable here ({why_not})"
        return "SDPA with the dense block-causal bias: this models.attention has no 'flex' attention backend"
    return 'SDPA group by group of scales, PyTorch\'s ops (the C kernel and the fused CPU paths run only eagerly)'


def compile_blocks(var: nn.Module, *, mode: Optional[str] = None, backend: str = 'inductor') -> nn.Module:
    """Compile each of var.blocks in place (fullgraph, static shapes, torch.compile's `mode`) and return var.

    backend: torch.compile's backend ('inductor'; the tests trace with 'aot_eager', which runs the traced graphs
    without generating code). See the module docstring for what runs compiled and what does not.
    """
    blocks = getattr(var, 'blocks', None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise TypeError(f'compile_blocks takes a VAR (a model with transformer blocks in .blocks), got {type(var).__name__}')
    device = next(var.parameters()).device
    attention = _training_attention(var, device)
    limit = _raise_recompile_limits(recompile_limit_for(var))
    for block in blocks:
        block.compile(fullgraph=True, dynamic=False, mode=mode, backend=backend)
        block._compiled_call_impl = _TeacherForcingOnly(block, block._compiled_call_impl)
    n_graphs = len({_structure(b) for b in blocks})
    logger.info('compiled %d transformer blocks one by one (torch.compile fullgraph=True, dynamic=False, mode=%s, backend=%s): '
                '%d graph(s) per input shape shared by all blocks, recompile limit %d; KV-cached sampling runs them eagerly',
                len(blocks), mode or 'default', backend, n_graphs, limit)
    logger.info('compiled blocks attend by %s', attention)
    return var


def compiled_blocks(var: nn.Module) -> int:
    """How many of var.blocks compile_blocks compiled."""
    return sum(isinstance(getattr(b, '_compiled_call_impl', None), _TeacherForcingOnly) for b in var.blocks)
