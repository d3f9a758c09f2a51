"""FlexAttention for VAR's block-causal teacher forcing: the 'flex' attention backend's kernel and its BlockMask.

In teacher forcing a token may attend another iff its scale is the same or finer (scale(q) >= scale(kv)), the mask
VAR keeps densely as `attn_bias_for_masking`. Here that mask is a FlexAttention BlockMask made by create_block_mask
from the mask_mod `scale_of_token[q] >= scale_of_token[kv]`: FlexAttention then skips the key blocks a query block
cannot see and never reads an L×L bias. One BlockMask is built per (scale token counts, device) and kept, so a
training run builds one per progressive stage, not one per step or per block.

FlexAttention is fused (Triton on CUDA, C++ on the CPU) only under torch.compile; called eagerly it computes the full
score matrix: correct, but slower than SDPA, and logged once when it happens. On the CPU it has no backward, so
CPU training with 'flex' takes the other paths (`flex_applies`).

torch.nn.attention.flex_attention is imported on first use, not with this module (it pulls in torch.fx's symbolic
shapes); after that first eager use its functions are plain module globals, which torch.compile traces without breaks.

Letters: B batch, H heads, L tokens (queries and keys: self-attention over all scales fed), c head dim.
"""
import importlib
import importlib.util
import logging
from typing import Dict, Optional, Sequence, Tuple

import torch


__all__ = ['flex_available', 'flex_applies', 'block_mask_over_scales', 'scale_lengths_of_mask', 'block_causal_flex_attention',
           'cached_block_masks', 'clear_block_masks']

logger = logging.getLogger(__name__)

_API = None                         # torch.nn.attention.flex_attention once imported; False: not importable here
_AVAILABLE: Dict[str, bool] = {}    # device type → flex_available, worked out once
# (scale token counts, device type, device index) → BlockMask: plain dict, no lru_cache (torch.compile traces through
# an lru_cache wrapper and would build the mask inside the graph)
_BLOCK_MASKS: Dict[Tuple[Tuple[int, ...], str, Optional[int]], object] = {}
_NOTED_EAGER = False


def _api():
    """The torch.nn.attention.flex_attention module, or None where this PyTorch has none."""
    global _API
    if _API is None:
        try:
            _API = importlib.import_module('torch.nn.attention.flex_attention')
        except Exception:   # PyTorch before 2.5, or a build without it
            _API = False
    return None if _API is False else _API


def _triton_present() -> bool:
    try:
        return importlib.util.find_spec('triton') is not None
    except (ImportError, ValueError):
        return False


def flex_available(device) -> bool:
    """Whether FlexAttention runs on this device here: CUDA with Triton (what torch.compile lowers it to), or the CPU
    (forward only: PyTorch's CPU FlexAttention has no backward)."""
    device_type = torch.device(device).type
    if device_type not in _AVAILABLE:
        usable = _api() is not None
        if device_type == 'cuda':
            usable = usable and torch.cuda.is_available() and _triton_present()
        elif device_type != 'cpu':
            usable = False
        _AVAILABLE[device_type] = usable
    return _AVAILABLE[device_type]


def flex_applies(dropout_p: float, *qkv: torch.Tensor) -> bool:
    """Whether the masked attention of these q, k, v (or of one qkv tensor) may go through FlexAttention: no attention
    dropout (FlexAttention has none), flex available on their device, and no gradient asked for on the CPU."""
    x = qkv[0]
    if dropout_p != 0.0 or not flex_available(x.device):
        return False
    return not (x.device.type == 'cpu' and torch.is_grad_enabled() and any(t.requires_grad for t in qkv))


def _build_block_mask(scale_lengths: Tuple[int, ...], device: torch.device):
    L = sum(scale_lengths)
    scale_of_token_L = torch.repeat_interleave(torch.arange(len(scale_lengths), dtype=torch.int32, device=device),
                                               torch.tensor(scale_lengths, device=device), output_size=L)

    def same_or_coarser_scale(b, h, q_idx, kv_idx):
        return scale_of_token_L[q_idx] >= scale_of_token_L[kv_idx]

    return _api().create_block_mask(same_or_coarser_scale, None, None, L, L, device=device)


def block_mask_over_scales(scale_lengths: Sequence[int], device):
    """The BlockMask of VAR's block-causal mask over scales of these token counts, on `device`; built on first use
    and kept. While torch.compile traces, a mask not built yet is built in the graph and not kept."""
    device = torch.device(device)
    if device.type == 'cuda' and device.index is None:   # 'cuda' and 'cuda:0' are one device: one mask
        device = torch.device('cuda', torch.cuda.current_device())
    key = (tuple(int(n) for n in scale_lengths), device.type, device.index)
    block_mask = _BLOCK_MASKS.get(key)
    if block_mask is None:
        block_mask = _build_block_mask(key[0], device)
        if not torch.compiler.is_compiling():
            _BLOCK_MASKS[key] = block_mask
    return block_mask


def cached_block_masks() -> int:
    """How many BlockMasks are kept (one per scale token counts and device used so far)."""
    return len(_BLOCK_MASKS)


def clear_block_masks() -> None:
    """Drop the kept BlockMasks (they hold a few small index tensors per shape; for tests and long-lived processes)."""
    _BLOCK_MASKS.clear()


def scale_lengths_of_mask(attn_bias: torch.Tensor, L: int) -> Optional[Tuple[int, ...]]:
    """The scale token counts whose block-causal mask this dense one is (additive 0 / -inf, or a boolean keep-mask,
    one (L, L) for every batch row and head), or None for any other mask. Reads the mask on the host: not for tracing."""
    if attn_bias.shape[-2:] != (L, L) or any(n != 1 for n in attn_bias.shape[:-2]):
        return None
    bias_LL = attn_bias.reshape(L, L)
    if bias_LL.dtype == torch.bool:
        keep_LL = bias_LL
    else:
        keep_LL = bias_LL == 0
        if not bool((keep_LL | torch.isneginf(bias_LL)).all()):   # a finite nonzero bias is not a mask
            return None
    key_end_L = keep_LL.sum(dim=-1)
    if not torch.equal(keep_LL, torch.arange(L, device=keep_LL.device)[None, :] < key_end_L[:, None]):
        return None   # some row does not read a prefix of the keys
    key_end, lengths, begin = key_end_L.tolist(), [], 0
    while begin < L:   # a scale: the rows [begin, end) all read keys [0, end)
        end = key_end[begin]
        if end <= begin or any(e != end for e in key_end[begin:end]):
            return None
        lengths.append(end - begin)
        begin = end
    return tuple(lengths)


def _note_eager_once() -> None:
    global _NOTED_EAGER
    if not _NOTED_EAGER:
        _NOTED_EAGER = True
        logger.warning('attention backend flex: FlexAttention is running eagerly, which computes the whole score matrix '
                       '(correct, slower than SDPA); it is fused only inside torch.compile (compile the blocks)')


def block_causal_flex_attention(q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale: float,
                                block_mask) -> torch.Tensor:
    """softmax(scale·q·kᵀ masked by `block_mask`)·v → (B, H, L, c)."""
    device_type = q_BHLc.device.type
    if torch.is_autocast_enabled(device_type):
        # as SDPA under autocast: q, k and v in the autocast dtype (the L2-normalised q and k come out of it in float32)
        dtype = torch.get_autocast_dtype(device_type)
        q_BHLc, k_BHLc, v_BHLc = q_BHLc.to(dtype), k_BHLc.to(dtype), v_BHLc.to(dtype)
    if q_BHLc.device.type == 'cpu':
        # inductor's C++ FlexAttention template (PyTorch 2.14) gives wrong outputs when q, k and v come in different
        # layouts (q and k fresh from the L2 norm, v a strided view of qkv); one layout for all three is right
        q_BHLc, k_BHLc, v_BHLc = q_BHLc.contiguous(), k_BHLc.contiguous(), v_BHLc.contiguous()
    if not torch.compiler.is_compiling():
        _note_eager_once()
    return _api().flex_attention(q_BHLc, k_BHLc, v_BHLc, block_mask=block_mask, scale=scale)
