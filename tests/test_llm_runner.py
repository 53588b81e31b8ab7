"""The runner's input paths and the model against transformers: CUDA-graph decode and prefill replays
and the fused RoPE attention branch (emulated on CPU), other model families, host tensors."""
from __future__ import annotations

import pytest
import torch

from llm.sampling import SamplingParams
from tests.llm_helpers import (MAX_TOKENS, PROMPTS, emulate_decode_graphs, emulate_fused_rope,
                               emulate_prefill_graphs, hf_greedy, make_engine)


@pytest.mark.parametrize("mixed", [True, False])
def test_mixed_steps_through_decode_and_prefill_graphs_match_transformers(checkpoint, reference, mixed):
    """mixed_prefill_graphs: a step with decode rows and up to 2 fresh prompts replays graphs only."""
    e = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=64, mixed_prefill_graphs=mixed)
    emulate_decode_graphs(e)
    emulate_prefill_graphs(e)
    calls = {"replays": 0, "eager": 0}

    def counted(name):
        method = getattr(e.runner, f"_{name}")

        def call(*args):
            calls[name] += 1
            return method(*args)
        return call

    e.runner._replays, e.runner._eager = counted("replays"), counted("eager")
    results = e.generate(PROMPTS * 2, SamplingParams(max_tokens=MAX_TOKENS))
    assert [r["text"] for r in results] == [reference[p][1] for p in PROMPTS * 2]
    assert (calls["replays"] > 0) == mixed and calls["eager"] > 0  # long prompts and prefix hits stay eager


def test_mixed_prefill_graphs_without_graphs_runs_eagerly(checkpoint, reference):
    """On CPU (or with cuda_graphs off) the setting changes nothing: every step runs eagerly."""
    e = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=64, mixed_prefill_graphs=True)
    results = e.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    assert [r["text"] for r in results] == [reference[p][1] for p in PROMPTS]


# budget 16: one chunk a step, each attending alone; prompts split into chunks after the first (start >
# 0). Budget 512: a step's chunks attend as one group (attention.prefill_grouped). The repeats hit the
# prefix cache either way.
@pytest.mark.parametrize("seqs,budget,path", [(16, 16, "alone"), (3, 512, "grouped")])
def test_fused_rope_attention_path_matches_transformers(checkpoint, reference, monkeypatch, seqs, budget, path):
    e = make_engine(checkpoint, max_seqs=seqs, max_context=256, step_token_budget=budget)
    emulate_fused_rope(e, monkeypatch)
    from llm import attention

    prefill, group_inputs, starts = attention.prefill, attention.prefill_group_inputs, {"alone": [], "grouped": []}

    def counted(*args):
        starts["alone"].append(args[6])  # the chunk's first position
        return prefill(*args)

    def counted_group(specs, *args):
        starts["grouped"] += [start for _, _, start, _ in specs]
        return group_inputs(specs, *args)

    monkeypatch.setattr(attention, "prefill", counted)
    monkeypatch.setattr(attention, "prefill_group_inputs", counted_group)
    results = e.generate(PROMPTS * 2, SamplingParams(max_tokens=MAX_TOKENS))
    assert [r["text"] for r in results] == [reference[p][1] for p in PROMPTS * 2]
    seen = starts[path]
    assert 0 in seen and any(start > 0 for start in seen) and e.scheduler.prefix_hit > 0, starts


# budget 5: prompts end in 1-token prefill chunks, so a decode step mixes known and in-flight tokens.
@pytest.mark.parametrize("seqs,budget,overlap", [(16, 64, True), (3, 64, False), (3, 5, True)])
def test_decode_graph_path_matches_transformers(checkpoint, reference, seqs, budget, overlap):
    e = make_engine(checkpoint, max_seqs=seqs, max_context=256, step_token_budget=budget, overlap=overlap)
    sizes = emulate_decode_graphs(e)
    results = e.generate(PROMPTS * 2, SamplingParams(max_tokens=MAX_TOKENS))
    assert [r["text"] for r in results] == [reference[p][1] for p in PROMPTS * 2]
    assert len(sizes) >= MAX_TOKENS - 2 and max(sizes) > 1
    if seqs == 16:  # some steps were padded to a larger bucket
        assert any(n not in e.runner.batch_buckets for n in sizes)


def _random_hf_checkpoint(out, arch: str):
    """A tiny HF model of another family (random, well-spread logits) with the tiny tokenizer."""
    import transformers

    from export.random_llm import SHAPES, build_tokenizer

    base = {k: v for k, v in SHAPES["tiny"].items() if k != "rope_theta"}
    config = getattr(transformers, f"{arch}Config")(**base, architectures=[f"{arch}ForCausalLM"])
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            std = 1.0 if "embed" in name else 0.1 if p.dim() == 1 else p.shape[1] ** -0.5 * (4 if "lm_head" in name else 1)
            p.normal_(0, std)
    model.save_pretrained(out)
    build_tokenizer(config.vocab_size).save_pretrained(out)


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_other_families_match_transformers(tmp_path, arch):
    _random_hf_checkpoint(tmp_path, arch)
    expected = hf_greedy(tmp_path, PROMPTS[:4], 12)
    e = make_engine(tmp_path, max_seqs=4, max_context=256, step_token_budget=16)
    results = e.generate(PROMPTS[:4], SamplingParams(max_tokens=12))
    for p, r in zip(PROMPTS[:4], results):
        assert r["text"] == expected[p][1], (arch, p)


@pytest.mark.parametrize("data,dtype", [([1, 2, -3], torch.long), ([7], torch.int32), ([0.5, 2.0], torch.float32),
                                        ([[1, 2], [3, 4]], torch.long), ([], torch.long), ([1.5, 2.7], torch.long)])
def test_host_tensor_equals_torch_tensor(data, dtype):
    from llm.device import host_tensor

    t = host_tensor(data, dtype)
    assert t.dtype == dtype and torch.equal(t, torch.tensor(data, dtype=dtype))
