"""The MLP activation (llm/activation.py): the Triton SiLU*up kernel against the torch path on a GPU;
the torch path against the unfused HF form everywhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm import activation


def test_silu_mul_torch_is_hf_gate_up():
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    out = activation.silu_mul_torch(torch.cat([gate, up], dim=-1))
    # (last-bit differences: torch's CPU SiLU vectorizes the contiguous gate, not the strided half)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or activation.triton is None, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,inter", [(1, 64), (7, 1000), (300, 2 * activation.BLOCK + 40), (0, 64)])
def test_silu_mul_triton_matches_torch(dtype, N, inter):
    g = torch.Generator().manual_seed(1)
    gate_up = (3 * torch.randn(N, 2 * inter, generator=g)).to("cuda", dtype)
    out = activation.silu_mul_triton(gate_up)
    ref = activation.silu_mul_torch(gate_up)
    assert out.shape == ref.shape == (N, inter) and out.dtype == dtype
    # bf16: one rounding step apart at most (the kernel's exp differs from torch's in the last fp32 bits)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(out, ref, **tol)
