"""Sampling without launch overhead on CUDA: each scale's transformer pass captured once as a CUDA graph and replayed.

`use_cuda_graphs(var)` gives the model a scale pass (`var.scale_logits`, the seam of models.sampling.sample_next_scale)
that, per scale si of a call, copies the scale's input into a static buffer and replays one graph of every block and the
head. Everything a graph reads or writes stays at one address across calls:

- one set of graphs per (doubled batch, input dtype, autocast dtype, device, inference mode, attention backend, fast
  paths): in it, the KV caches of every block (capacity var.L, allocated by the blocks at the first pass, then owned
  here), the static inputs (x_2BlC per scale, the two conditions shared by the scales) and outputs (the float32 logits
  per scale, in one memory pool shared by the set's graphs, which always replay in capture order);
- scale si's graph writes its keys and values at [begin_si, end_si) of the caches and attends to their first end_si
  tokens, so its shapes are fixed: query length pn*pn, keys end_si.

A scale is captured the first time it runs in its set: warm-up passes on a side stream, then the capture on that
stream (the pattern of PyTorch's CUDA-graph notes), then one replay for this call's logits. Warm-up and capture run
autocast without its weight cache (a cached cast made outside the graph would be freed under it). The token draws
(top-k/top-p, multinomial, Gumbel) stay outside the graphs, on the caller's generator, so the random stream and the
tokens for a seed are the plain pass's. A replayed scale step makes no host synchronisation.

The raw logits hooks see (ScaleDraw.logits_2BlV, on_scale) are then a graph's output buffer: valid until the same scale
of the next call with the same batch; clone them to keep them. When the model's parameters or buffers move (.to(),
.half(), load_state_dict(..., assign=True): a data_ptr changes), every set is dropped and captured again at the next
call. In training mode, with autograd on, off CUDA, or where a capture fails, the plain pass runs (logged once).

`ScaleGraphs(capture=False)` runs the same static buffers and owned caches without capturing (on the CPU too): what
the graphs replay, as eager ops, for testing.

Letters: B batch (2B: the doubled batch of guidance), l tokens of one scale, C width, D condition width, V vocabulary,
H heads, S cache capacity (var.L), c head dim, si scale index.
"""
import contextlib
import itertools
import logging
from typing import Dict, Hashable, List, Optional, Tuple

import torch
import torch.nn as nn

from utils.cpu_speed import fast_paths_enabled
from models.sampling import scale_logits

__all__ = ['use_cuda_graphs', 'ScaleGraphs', 'WARMUP_PASSES']

logger = logging.getLogger(__name__)

# eager passes on the capture stream before a capture: lazy initialisation (library handles, workspaces) happens there,
# not inside the graph; PyTorch's make_graphed_callables does 3
WARMUP_PASSES = 3


def _autocast_state(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force on this device type, or None when autocast is off."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _without_autocast_cache(device_type: str):
    """Autocast as it is, but without its cache of cast weights (a capture must record the casts, not read a cached
    copy that is freed when the caller's autocast block ends)."""
    dtype = _autocast_state(device_type)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def _copy_into(static: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if value.shape != static.shape or value.dtype != static.dtype or value.device != static.device:
        raise RuntimeError(f'{name} is {tuple(value.shape)} {value.dtype} on {value.device}, but this scale pass was set up for '
                           f'{tuple(static.shape)} {static.dtype} on {static.device}')
    static.copy_(value)


class _ScaleSet:
    """The graphs of one batch, dtype and autocast state: the caches they share, and per scale the static input, the
    graph and its output."""

    def __init__(self, capture: bool, device: torch.device):
        self.capture = capture
        self.kv_per_block: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None   # (k_2BHSc, v_2BHSc) per block
        self.cond_2BD_or_gss: Optional[torch.Tensor] = None
        self.cond_2BD: Optional[torch.Tensor] = None
        self.x_2BlC: Dict[int, torch.Tensor] = {}
        self.logits_2BlV: Dict[int, torch.Tensor] = {}
        self.graphs: Dict[int, 'torch.cuda.CUDAGraph'] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.stream = torch.cuda.Stream(device) if capture else None   # warm-up and capture, for every scale of the set
        self.failed: Optional[str] = None   # why a capture failed: the plain pass from then on
        self.next_si = 0

    def run(self, var: nn.Module, si: int, x_2BlC: torch.Tensor, cond_2BD_or_gss: torch.Tensor, cond_2BD: torch.Tensor) -> torch.Tensor:
        if si != self.next_si:
            raise RuntimeError(f'scale {si} came after scale {self.next_si - 1}: the scale passes of a call run in order 0, 1, ...')
        self.next_si = si + 1
        if self.failed is not None:
            self._seek(var, si)
            logits_2BlV = scale_logits(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD)
            self._keep_caches(var)
            return logits_2BlV
        self._load(si, x_2BlC, cond_2BD_or_gss, cond_2BD)
        graph = self.graphs.get(si)
        if graph is not None:
            graph.replay()
            return self.logits_2BlV[si]
        if not self.capture:
            self._seek(var, si)
            logits_2BlV = self._pass(var, si)
            self._keep_caches(var)
            return logits_2BlV
        return self._capture(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD)

    def _load(self, si: int, x_2BlC: torch.Tensor, cond_2BD_or_gss: torch.Tensor, cond_2BD: torch.Tensor) -> None:
        """This call's inputs into the static buffers (made from the first call's)."""
        if self.cond_2BD is None:
            self.cond_2BD_or_gss, self.cond_2BD = cond_2BD_or_gss.clone(), cond_2BD.clone()
        else:
            _copy_into(self.cond_2BD_or_gss, cond_2BD_or_gss, 'cond_2BD_or_gss')
            _copy_into(self.cond_2BD, cond_2BD, 'cond_2BD')
        if si in self.x_2BlC:
            _copy_into(self.x_2BlC[si], x_2BlC, f'x_2BlC of scale {si}')
        else:
            self.x_2BlC[si] = x_2BlC.clone()

    def _seek(self, var: nn.Module, si: int) -> None:
        """Point every block's KV cache at the owned caches, scale si's tokens going after the first begin_si."""
        if self.kv_per_block is None:   # the first pass: the blocks allocate caches of their keys' dtype, kept from then on
            if si != 0:
                raise RuntimeError(f'the KV caches are made at scale 0, not at scale {si}')
            for b in var.blocks:
                b.attn.kv_caching(True, capacity=var.L)
            return
        filled = var.begin_ends[si][0]
        for b, kv in zip(var.blocks, self.kv_per_block):
            b.attn.kv_cache_into(kv, filled)

    def _keep_caches(self, var: nn.Module) -> None:
        if self.kv_per_block is None:
            kv_per_block = [b.attn.kv_buffers for b in var.blocks]
            if any(kv is None for kv in kv_per_block):
                raise RuntimeError('a block cached no keys at scale 0: its attention must cache with a capacity '
                                   '(SelfAttention.kv_caching(True, capacity))')
            self.kv_per_block = kv_per_block

    def _pass(self, var: nn.Module, si: int) -> torch.Tensor:
        """The plain pass on the static buffers."""
        with _without_autocast_cache(self.x_2BlC[si].device.type):
            return scale_logits(var, si, self.x_2BlC[si], self.cond_2BD_or_gss, self.cond_2BD)

    def _capture(self, var: nn.Module, si: int, x_2BlC: torch.Tensor, cond_2BD_or_gss: torch.Tensor, cond_2BD: torch.Tensor) -> torch.Tensor:
        main = torch.cuda.current_stream(x_2BlC.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_PASSES):   # each writes the same keys and values at the same place: repeatable
                self._seek(var, si)
                self._pass(var, si)
                self._keep_caches(var)
        main.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        try:
            self._seek(var, si)
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                logits_2BlV = self._pass(var, si)
        except RuntimeError as e:   # an op that cannot be captured: the plain pass, into the same caches
            torch.cuda.set_stream(main)   # a failed capture_end leaves the capture stream current
            main.wait_stream(self.stream)
            self.failed = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
            logger.warning('CUDA graphs: capturing scale %d failed (%s); sampling runs the plain per-scale pass for batch %d',
                           si, self.failed, x_2BlC.shape[0] // 2)
            self._seek(var, si)
            return scale_logits(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD)
        self.graphs[si], self.logits_2BlV[si] = graph, logits_2BlV
        graph.replay()
        return logits_2BlV


class ScaleGraphs:
    """A model's scale pass (models.sampling.ScalePass) through static buffers and owned KV caches, replayed as one
    CUDA graph per scale with capture=True (on CUDA), run eagerly with capture=False."""

    def __init__(self, capture: bool = True):
        self.capture = capture
        self._sets: Dict[Hashable, _ScaleSet] = {}
        self._fingerprint: Optional[Tuple[int, ...]] = None
        self._current: Optional[_ScaleSet] = None
        self._logged: set = set()
        self.sets_made = 0   # sets of static buffers and caches set up so far (again after the parameters moved)

    # a copy of a model (copy.deepcopy, pickle) gets an empty one: graphs and caches belong to this model's tensors
    def __getstate__(self):
        return {'capture': self.capture}

    def __setstate__(self, state):
        self.__init__(**state)

    def __call__(self, var: nn.Module, si: int, x_2BlC: torch.Tensor, cond_2BD_or_gss: torch.Tensor, cond_2BD: torch.Tensor) -> torch.Tensor:
        if si == 0:
            self._current = self._set_for(var, x_2BlC)
            if self._current is not None:
                self._current.next_si = 0
        if self._current is None:
            return scale_logits(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD)
        return self._current.run(var, si, x_2BlC, cond_2BD_or_gss, cond_2BD)

    @property
    def captured(self) -> Dict[Hashable, int]:
        """How many scales each set has captured, by its key."""
        return {key: len(s.graphs) for key, s in self._sets.items()}

    def drop(self) -> None:
        """Free every graph, cache and static buffer (captured again at the next call)."""
        self._sets.clear()
        self._current = None

    def _plain(self, why: str) -> None:
        if why not in self._logged:
            self._logged.add(why)
            logger.info('CUDA graphs: %s; sampling runs the plain per-scale pass', why)

    def _set_for(self, var: nn.Module, x_2BlC: torch.Tensor) -> Optional[_ScaleSet]:
        """The set of graphs for this call (at scale 0), or None for the plain pass."""
        device = x_2BlC.device
        if self.capture and device.type != 'cuda':
            return self._plain(f'the model is on {device.type}, not CUDA')
        if var.training:
            return self._plain('the model is in training mode (call var.eval() to sample with graphs)')
        if torch.is_grad_enabled():
            return self._plain('autograd is on (sampling runs under torch.no_grad or torch.inference_mode)')
        fingerprint = tuple(t.data_ptr() for t in itertools.chain(var.parameters(), var.buffers()))
        if fingerprint != self._fingerprint:
            if self._sets:
                logger.info('CUDA graphs: the model\'s parameters moved; %d set(s) of scale graphs dropped, captured again',
                            len(self._sets))
            self.drop()
            self._fingerprint = fingerprint
        key = (x_2BlC.shape[0], x_2BlC.dtype, _autocast_state(device.type), device, torch.is_inference_mode_enabled(),
               getattr(var, 'attn_backend', None), fast_paths_enabled())
        found = self._sets.get(key)
        if found is None:
            found = self._sets[key] = _ScaleSet(self.capture, device)
            self.sets_made += 1
        return found


def _why_no_graphs(var: nn.Module) -> Optional[str]:
    if not torch.cuda.is_available():
        return 'CUDA is not available'
    device = next(var.parameters()).device
    if device.type != 'cuda':
        return f'the model is on {device.type}, not CUDA'
    return None


def use_cuda_graphs(var: nn.Module, enabled: bool = True) -> nn.Module:
    """Sample with each scale's transformer pass replayed as a CUDA graph (see the module's docstring); the same tokens
    and images for a seed as without. enabled=False restores the plain pass. On the CPU, or without CUDA, the plain
    pass stays, with one logged line. Call it after the model is on its GPU; returns var."""
    if not enabled:
        if isinstance(getattr(var, 'scale_logits', None), ScaleGraphs):
            del var.scale_logits
        return var
    why = _why_no_graphs(var)
    if why is not None:
        logger.info('CUDA graphs: off (%s); sampling runs the plain per-scale pass', why)
        return var
    existing = getattr(var, 'scale_logits', None)
    if not (isinstance(existing, ScaleGraphs) and existing.capture):
        var.scale_logits = ScaleGraphs(capture=True)
        logger.info('CUDA graphs: on for sampling, one graph per scale, captured at the first call of each batch size, '
                    'dtype and autocast setting')
    return var
