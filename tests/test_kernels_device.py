"""The CPU fast paths stay on the CPU: on another device (here 'meta', which runs no arithmetic) the tokenizer's
layout, its upsampling and block-causal attention take the reference's plain ops. On CUDA the grouped attention,
polyphase upsampling and channels-last tokenizer cost time and memory against the reference's ops (tools/gpu_check.sh;
docs/performance.md, GPU)."""
import pytest
import torch

import cpu_kernels.attention as cpu_attention
import cpu_kernels.upsample as upsample
from cpu_kernels import block_causal
from cpu_kernels.attention import attention
from cpu_kernels.memory import to_conv_layout
from cpu_kernels.upsample import upsample2x_conv3x3
from models.attention import BlockCausal, block_causal_groups


def refuse(*_, **__):
    raise AssertionError('a CPU fast path ran on another device')


def test_tokenizer_layout_stays_nchw_off_the_cpu():
    x = torch.empty(2, 160, 16, 16, device='meta')
    assert to_conv_layout(x, 160, True) is x
    cpu = to_conv_layout(torch.zeros(1, 160, 8, 8), 160, True)   # on the CPU a wide tokenizer does change layout
    assert cpu.is_contiguous(memory_format=torch.channels_last) or cpu.is_contiguous()


def test_upsampling_is_nearest_then_conv_off_the_cpu(monkeypatch):
    monkeypatch.setattr(upsample, 'phase_kernels', refuse)
    out = upsample2x_conv3x3(torch.empty(2, 8, 5, 5, device='meta'), torch.empty(8, 8, 3, 3, device='meta'), torch.empty(8, device='meta'))
    assert out.shape == (2, 8, 10, 10)


def test_block_causal_attention_is_one_masked_call_off_the_cpu(monkeypatch):
    lengths = [1, 4, 9, 16, 64, 100]
    L = sum(lengths)
    mask = BlockCausal(block_causal_groups(lengths), torch.zeros(1, 1, L, L, device='meta'))
    q = torch.empty(2, 4, L, 16, device='meta')
    monkeypatch.setattr(cpu_attention, '_block_causal_attention', refuse)
    assert attention(q, q, q, 0.25, mask).shape == (2, 4, L, 16)
    assert not block_causal.applies(torch.empty(2, L, 3, 4, 16, device='meta'), mask, 0.0, 'sdpa')   # nor the fused one
    with pytest.raises(AssertionError, match='a CPU fast path ran'):   # the CPU still goes by groups
        attention(torch.zeros(1, 1, L, 8), torch.zeros(1, 1, L, 8), torch.zeros(1, 1, L, 8), 0.25, BlockCausal(mask.groups, torch.zeros(1, 1, L, L)))
