"""Attention over the paged KV cache (llm/attention.py): the torch paths against a naive per-sequence
reference on CPU; the Triton kernel against the torch path where a GPU exists."""
from __future__ import annotations

import pytest
import torch

from llm import attention

H, KVH, D, BS = 8, 2, 16, 4


def make_cache(num_blocks: int, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = torch.randn(num_blocks, BS, KVH, D, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, BS, KVH, D, generator=g).to(device, dtype)
    return k, v


def naive(q, keys, values):
    """q [T, H, D] at the last T positions of keys/values [L, KVH, D]; causal; GQA as HF repeat_kv."""
    T, L = q.shape[0], keys.shape[0]
    k = keys.repeat_interleave(H // KVH, dim=1).float()  # [L, H, D]
    v = values.repeat_interleave(H // KVH, dim=1).float()
    s = torch.einsum("thd,lhd->htl", q.float(), k) * D**-0.5
    allowed = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]
    s = s.masked_fill(~allowed.to(s.device), float("-inf"))
    return torch.einsum("htl,lhd->thd", s.softmax(-1), v)


def tables(lens, num_blocks, seed=1):
    """Random, distinct block tables (never block 0) for sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    out = []
    for n in lens:
        nb = -(-n // BS)
        out.append(ids[:nb])
        ids = ids[nb:]
    width = max(len(t) for t in out)
    return torch.tensor([t + [0] * (width - len(t)) for t in out], dtype=torch.int32)


def gather(cache, row, n):
    return cache[row.long()].reshape(-1, KVH, D)[:n]


def test_decode_torch_matches_naive_reference():
    kc, vc = make_cache(64)
    lens = [1, 3, 4, 5, 17, 40]
    bt = tables(lens, 64)
    q = torch.randn(len(lens), H, D)
    out = attention.decode_torch(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), D**-0.5)
    for i, n in enumerate(lens):
        ref = naive(q[i : i + 1], gather(kc, bt[i], n), gather(vc, bt[i], n))[0]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start,n", [(0, 7), (0, 1), (5, 6), (8, 9), (13, 1)])
def test_prefill_chunk_matches_naive_reference(start, n):
    kc, vc = make_cache(32)
    row = tables([start + n], 32)[0].long()
    slots = torch.tensor([row[p // BS] * BS + p % BS for p in range(start, start + n)])
    k, v = torch.randn(n, KVH, D), torch.randn(n, KVH, D)
    kc.view(-1, KVH, D)[slots] = k
    vc.view(-1, KVH, D)[slots] = v
    q = torch.randn(n, H, D)
    out = attention.prefill(q, k, v, kc, vc, row, start, D**-0.5)
    ref = naive(q, gather(kc, row, start + n), gather(vc, row, start + n))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: SDPA's flash kernel, GQA inside it
@pytest.mark.parametrize("start,n", [(0, 70), (40, 90)])
def test_prefill_chunk_on_gpu_matches_naive_reference(dtype, start, n):
    kc, vc = make_cache(64, dtype, "cuda")
    row = tables([start + n], 64)[0].long().cuda()
    slots = torch.tensor([row[p // BS] * BS + p % BS for p in range(start, start + n)], device="cuda")
    k, v = kc.view(-1, KVH, D)[slots], vc.view(-1, KVH, D)[slots]
    q = torch.randn(n, H, D, device="cuda").to(dtype)
    out = attention.prefill(q, k, v, kc, vc, row, start, D**-0.5)
    ref = naive(q, gather(kc, row, start + n), gather(vc, row, start + n))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def grouped_case(device="cpu", dtype=torch.float32):
    """Chunks (start, n) of 7 sequences after 3 decode rows, fresh and after a cached prefix, with keys
    in random blocks -> (q, k_cache, v_cache, specs [(offset, n, start, blocks)], block tables)."""
    kc, vc = make_cache(128, dtype, device)
    shapes = [(0, 7), (0, 2), (5, 6), (8, 9), (13, 2), (0, 20), (30, 3)]
    bt = tables([start + n for start, n in shapes], 128)
    specs, off = [], 3
    for (start, n), row in zip(shapes, bt.tolist()):
        specs.append((off, n, start, row[: -(-(start + n) // BS)]))
        off += n
    q = torch.randn(off, H, D).to(device, dtype)
    return q, kc, vc, specs, bt.to(device)


@pytest.mark.parametrize("device,dtype,tol", [
    ("cpu", torch.float32, 1e-5),
    pytest.param("cuda", torch.bfloat16, 2e-2, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_prefill_grouped_matches_naive_reference(device, dtype, tol):
    q, kc, vc, specs, bt = grouped_case(device, dtype)
    g = attention.prefill_group_inputs(specs, BS, H // KVH, torch.device(device))
    y = torch.zeros_like(q)
    y[g.dest] = attention.prefill_grouped(q, kc, vc, g, D**-0.5)
    assert sorted(g.dest.tolist()) == list(range(3, q.shape[0]))
    for (off, n, start, _), row in zip(specs, bt):
        ref = naive(q[off : off + n], gather(kc, row, start + n), gather(vc, row, start + n))
        torch.testing.assert_close(y[off : off + n].float(), ref, atol=tol, rtol=tol)


def test_group_prefill_respects_its_caps_and_places_every_chunk_once(monkeypatch):
    monkeypatch.setattr(attention, "GROUP_MAX_KEYS", 64)
    monkeypatch.setattr(attention, "GROUP_MAX_SCORES", 64 * 24)
    # (offset, n, start, blocks): a chunk too long to group, then short ones with growing keys
    specs = [(0, attention.GROUP_MAX_QUERY + 1, 0, [1])] + [(0, n, s, [1]) for n, s in
                                                              [(8, 0), (16, 0), (4, 8), (2, 30), (20, 10), (3, 0)]]
    groups, alone = attention.group_prefill(specs, BS)
    assert sorted(alone + [i for g in groups for i in g]) == list(range(len(specs)))
    assert 0 in alone and all(len(g) >= 2 for g in groups) and groups
    for g in groups:
        q = max(specs[i][1] for i in g)
        k = max(-(-(specs[i][1] + specs[i][2]) // BS) * BS for i in g)
        assert len(g) * k <= attention.GROUP_MAX_KEYS and len(g) * q * k <= attention.GROUP_MAX_SCORES
    assert attention.group_prefill(specs[:2], BS) == ([], [0, 1])  # nothing to group with


def test_num_splits_fills_the_gpu_only_when_the_batch_does_not():
    assert attention.num_splits(1, 8, 132) == 16
    assert attention.num_splits(64, 8, 132) == 1


needs_triton = pytest.mark.skipif(not torch.cuda.is_available() or attention.triton is None,
                                  reason="the Triton kernel needs a CUDA GPU")


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_triton_decode_matches_torch(dtype, splits):
    kc, vc = make_cache(400, dtype, "cuda")
    lens = [1, 2, 15, 16, 17, 64, 65, 300, 1000]
    bt = tables(lens, 400).cuda()
    q = torch.randn(len(lens), H, D, device="cuda").to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = attention.decode_torch(q.float(), kc.float(), vc.float(), bt, seq_lens, D**-0.5)
    out = attention.decode_triton(q, kc, vc, bt, seq_lens, D**-0.5, splits)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@needs_triton
def test_engine_on_gpu_matches_transformers_with_either_attention_eager_or_compiled(tmp_path):
    from export.random_llm import write_random_checkpoint
    from llm.engine import Engine
    from llm.sampling import SamplingParams
    from llm.settings import EngineSettings
    from tests.llm_helpers import hf_greedy

    ckpt = write_random_checkpoint(tmp_path / "ckpt", "tiny")
    prompts = ["Hello world", "What is machine learning? " * 12, "a", "Once upon a time " * 20]
    greedy = hf_greedy(ckpt, prompts, 24)
    reference = [greedy[p][1] for p in prompts]
    from torch._dynamo.utils import counters

    # compile: the decode graphs replay torch.compile'd layers; mixed: mixed_prefill_graphs (mixed steps
    # with few fresh prompts replay the decode graph and prefill graphs instead of running eagerly).
    for impl, compile, mixed in [("torch", False, False), ("torch", True, False), ("triton", False, False),
                                 ("triton", True, False), ("triton", True, True)]:
        graphs = counters["stats"]["unique_graphs"]
        e = Engine(EngineSettings(checkpoint=str(ckpt), dtype="float32", max_seqs=4, max_context=256,
                                  step_token_budget=32, attention=impl, kv_cache_budget_mb=64, compile=compile,
                                  mixed_prefill_graphs=mixed),
                   device="cuda")
        assert e.runner.attention_impl == impl and e.runner.use_graphs
        if not mixed:  # (the mixed run's engine may reuse the previous run's compiled graph)
            assert (counters["stats"]["unique_graphs"] > graphs) == compile
        mixed_replays = e.runner.prefill_graph_replays
        texts = [r["text"] for r in e.generate(prompts * 2, SamplingParams(max_tokens=24))]
        assert texts == reference * 2, (impl, compile, mixed)
        assert not mixed or e.runner.prefill_graph_replays > mixed_replays  # prompts joined decoding steps
        # One at a time: each prompt's first chunk is a lone fresh prefill, replayed from a prefill
        # graph (token buckets 16/32 here); the repeats hit the prefix cache and run eagerly.
        replays = e.runner.prefill_graph_replays
        alone = [e.generate([p], SamplingParams(max_tokens=24))[0]["text"] for p in prompts * 2]
        assert alone == reference * 2, (impl, compile, mixed, "one at a time")
        assert e.runner.prefill_graph_replays > replays


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [37, 200])  # a head per program; 16 heads per program (12 live, 4 masked)
def test_triton_rope_and_cache_write_matches_torch(dtype, N):
    from llm.model import rotate_half

    assert (N >= attention.ROPE_HEADS_PER_PROGRAM_FROM) == (N == 200)
    ctx = 256
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(N, H + 2 * KVH, D, generator=g).to("cuda", dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(ctx).float(), inv)
    cos = torch.cat([freqs, freqs], -1).cos().to("cuda", dtype)
    sin = torch.cat([freqs, freqs], -1).sin().to("cuda", dtype)
    pos = torch.randint(0, ctx, (N,), generator=g).cuda()
    blocks = N // BS + 4
    slots = (torch.randperm(blocks * BS - BS, generator=g)[:N] + BS).cuda()
    kc, vc = [torch.zeros(blocks, BS, KVH, D, dtype=dtype, device="cuda") for _ in range(2)]
    q = attention.rope_and_write(qkv, cos, sin, pos, slots, kc, vc, H, KVH)
    untouched = torch.ones(blocks * BS, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert not kc.view(-1, KVH, D)[untouched].any() and not vc.view(-1, KVH, D)[untouched].any()
    qk = qkv[:, : H + KVH].float()
    ref = qk * cos[pos][:, None].float() + rotate_half(qk) * sin[pos][:, None].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q.float(), ref[:, :H], atol=tol, rtol=tol)
    torch.testing.assert_close(kc.view(-1, KVH, D)[slots].float(), ref[:, H:], atol=tol, rtol=tol)
    torch.testing.assert_close(vc.view(-1, KVH, D)[slots], qkv[:, H + KVH :])
