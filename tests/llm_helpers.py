"""Shared by the LLM engine tests (test_llm_engine, test_llm_runner, test_llm_scheduler): the prompts,
an engine factory, and CPU emulations of the CUDA-only paths (decode and prefill graphs, the fused RoPE
attention branch), so CI runs those input paths against transformers too. The tiny checkpoint and the
transformers reference are session fixtures in conftest.py."""
from __future__ import annotations

import torch

from llm.engine import Engine
from llm.settings import EngineSettings

PROMPTS = [
    "Hello world",
    "Once upon a time, there was a small model that wanted to generate text",
    "What is machine learning? " * 12,  # ~100 tokens: chunked prefill with step_token_budget=32
    "a",
    "Ünïcödé 🙂 中文",
    "def main(): print(0)",
]
MAX_TOKENS = 20


def make_engine(checkpoint, **kw) -> Engine:
    return Engine(EngineSettings(checkpoint=str(checkpoint), cpu_threads=1, **kw))


def hf_greedy(checkpoint, prompts, max_new_tokens: int, **generate_kw) -> dict[str, tuple[list[int], str]]:
    """transformers' greedy generate from the checkpoint dir (fp32): prompt -> (generated ids, their text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = {}
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        gen = hf.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, **generate_kw)
        gen = gen[0, ids["input_ids"].shape[1]:].tolist()
        out[p] = (gen, tok.decode(gen, skip_special_tokens=True))
    return out


def emulate_decode_graphs(e: Engine) -> list[int]:
    """Decode steps take the runner's CUDA-graph path (`_decode_graph`: packed inputs, padding to a
    batch bucket, in-flight tokens read on the device) on CPU: each 'graph' replays the eager model
    over the static input buffers, as a captured graph does. -> the decode batch size of each step."""
    from types import SimpleNamespace

    from llm import model as llm_model

    r, sizes = e.runner, []
    r.use_graphs = True

    def graph(B, nb):
        out = torch.empty(B, r.vocab_size)

        def replay():
            batch = llm_model.Batch(r.slots_buf[:B], B, r.table_buf[:B, :nb], r.lens_buf[:B])
            out.copy_(r.model(r.tokens_buf[:B], r.pos_buf[:B], r.cache.layers, batch, None))
        return SimpleNamespace(replay=replay), out

    decode_graph = r._decode_graph
    r._graph = graph
    r._decode_graph = lambda decode, prev: sizes.append(len(decode)) or decode_graph(decode, prev)
    return sizes


def emulate_prefill_graphs(e: Engine, buckets=(16, 32, 64)) -> None:
    """Fresh prompt chunks of up to buckets[-1] tokens take the prefill-graph path (`_prefill_replay`:
    padding to a token bucket, static inputs) on CPU. As with captured graphs, each bucket's graph
    has one output buffer that every replay of it overwrites."""
    from types import SimpleNamespace

    from llm import model as llm_model

    r, graphs, P = e.runner, {}, buckets[-1]
    r.prefill_buckets = list(buckets)
    r.p_tokens, r.p_slots = torch.zeros(P, dtype=torch.long), torch.zeros(P, dtype=torch.long)
    r.p_pos, r.p_row = torch.arange(P), torch.zeros(1, dtype=torch.long)

    def prefill_graph(n):
        if n not in graphs:
            out = torch.empty(1, r.vocab_size)

            def replay():
                batch = llm_model.Batch(r.p_slots[:n], 0, None, None, chunks=[(0, n, 0, r.p_slots[:1])])
                out.copy_(r.model(r.p_tokens[:n], r.p_pos[:n], r.cache.layers, batch, r.p_row))
            graphs[n] = (SimpleNamespace(replay=replay), out)
        return graphs[n]

    r._prefill_graph = prefill_graph


def emulate_fused_rope(e: Engine, monkeypatch) -> None:
    """The CUDA path's attention branch on CPU: RoPE and the k/v cache writes through
    `attention.rope_and_write` (an OpenAI-Triton kernel on GPU; here the same in torch), so chunks
    read their keys from the cache, as on the GPU."""
    from llm import attention
    from llm.model import rotate_half

    def rope_and_write(qkv, cos_table, sin_table, pos, slots, k_cache, v_cache, H, KVH):
        D = qkv.shape[-1]
        qk = qkv[:, : H + KVH]
        qk = qk * cos_table[pos][:, None] + rotate_half(qk) * sin_table[pos][:, None]
        k_cache.view(-1, KVH, D).index_copy_(0, slots, qk[:, H:].to(k_cache.dtype))
        v_cache.view(-1, KVH, D).index_copy_(0, slots, qkv[:, H + KVH :].to(v_cache.dtype))
        return qk[:, :H].contiguous()

    monkeypatch.setattr(attention, "rope_and_write", rope_and_write)
    e.runner.model.fused_rope = True
