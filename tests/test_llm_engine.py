"""The LLM engine in-process (no server): exact against transformers, batching, sampling, stops,
cancellation, validation. The tiny random-weight Llama is written to a temp dir (~2 s)."""
from __future__ import annotations

import pytest
import torch

from export.random_llm import write_random_checkpoint
from llm.engine import Engine, Metrics
from llm.kv_cache import BlockPool
from llm.sampling import SamplingParams
from llm.settings import EngineSettings, parse_overrides
from llm.text_stream import held_back

PROMPTS = [
    "Hello world",
    "Once upon a time, there was a small model that wanted to generate text",
    "What is machine learning? " * 12,  # ~100 tokens: chunked prefill with step_token_budget=32
    "a",
    "Ünïcödé 🙂 中文",
    "def main(): print(0)",
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("llm") / "checkpoint", "tiny")


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers greedy generate: generated ids and decoded text per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = {}
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")
        gen = hf.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        out[p] = (gen, tok.decode(gen, skip_special_tokens=True))
    return out


def make_engine(checkpoint, **kw) -> Engine:
    return Engine(EngineSettings(checkpoint=str(checkpoint), cpu_threads=1, **kw))


@pytest.fixture(scope="module")
def engine(checkpoint):
    # Few sequences and a small step budget: requests wait, prefill is chunked and mixed with decode.
    return make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=32)


def test_greedy_matches_transformers(engine, reference):
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    for p, r in zip(PROMPTS, results):
        ids, text = reference[p]
        assert r["error"] is None
        assert r["text"] == text, p
        assert r["num_output_tokens"] == len(ids)
        assert r["finish_reason"] == ("stop" if len(ids) < MAX_TOKENS else "length")
    assert engine.pool.num_free == engine.pool.usable and not engine.running  # every block returned


@pytest.mark.parametrize("seqs,budget,overlap", [(1, 8, True), (16, 512, True), (3, 16, False)])
def test_greedy_independent_of_batching(checkpoint, reference, seqs, budget, overlap):
    e = make_engine(checkpoint, max_seqs=seqs, max_context=256, step_token_budget=budget, overlap=overlap)
    results = e.generate(PROMPTS * 2, SamplingParams(max_tokens=MAX_TOKENS))
    assert [r["text"] for r in results] == [reference[p][1] for p in PROMPTS * 2]


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


# budget 16: prompts split into chunks after the first (start > 0); the repeats hit the prefix cache.
@pytest.mark.parametrize("seqs,budget", [(16, 16), (3, 512)])
def test_fused_rope_attention_path_matches_transformers(checkpoint, reference, monkeypatch, seqs, budget):
    e = make_engine(checkpoint, max_seqs=seqs, max_context=256, step_token_budget=budget)
    emulate_fused_rope(e, monkeypatch)
    from llm import attention

    prefill, starts = attention.prefill, []

    def counted(*args):
        starts.append(args[6])  # the chunk's first position
        return prefill(*args)

    monkeypatch.setattr(attention, "prefill", counted)
    results = e.generate(PROMPTS * 2, SamplingParams(max_tokens=MAX_TOKENS))
    assert [r["text"] for r in results] == [reference[p][1] for p in PROMPTS * 2]
    assert 0 in starts and any(start > 0 for start in starts) and e.scheduler.prefix_hit > 0


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


def test_stream_concatenation_equals_whole_text(engine):
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    whole = engine.generate(PROMPTS, params, stream=False)
    streamed = engine.generate(PROMPTS, params, stream=True)
    for w, s in zip(whole, streamed):
        assert len(w["chunks"]) == 1 and len(s["chunks"]) > 1
        assert "".join(s["chunks"]) == w["text"]
        assert s["num_output_tokens"] == w["num_output_tokens"] == MAX_TOKENS


def test_stream_interval_coalesces(checkpoint):
    e = make_engine(checkpoint, max_seqs=2, max_context=256, stream_interval=4)
    r = e.generate(["Hello world"], SamplingParams(max_tokens=16, ignore_eos=True), stream=True)[0]
    per_token = make_engine(checkpoint, max_seqs=2, max_context=256).generate(
        ["Hello world"], SamplingParams(max_tokens=16, ignore_eos=True), stream=True)[0]
    assert r["text"] == per_token["text"]
    assert len(r["chunks"]) <= 16 // 4 + 1 < len(per_token["chunks"])


def test_first_streamed_response_is_not_coalesced(checkpoint):
    # TTFT: with stream_interval=8 the first response still carries only the first token; the
    # following ones carry 8 tokens each, the final one the rest.
    e = make_engine(checkpoint, max_seqs=2, max_context=256, stream_interval=8)
    outs = []
    e.submit(e.make_request("Hello world", SamplingParams(max_tokens=20, ignore_eos=True), outs.append))
    while not (outs and outs[-1].finished):
        e.step()
    assert outs[0].text != "" and not outs[0].finished
    assert [o.num_output_tokens for o in outs] == [1, 9, 17, 20]
    per_token = make_engine(checkpoint, max_seqs=2, max_context=256).generate(
        ["Hello world"], SamplingParams(max_tokens=20, ignore_eos=True), stream=True)[0]
    assert outs[0].text == per_token["chunks"][0]
    assert "".join(o.text for o in outs) == per_token["text"]


class CountingMetrics(Metrics):
    def __init__(self):
        self.tokens, self.at_finish = 0, []

    def step(self, seconds, tokens):
        self.tokens += tokens

    def finished(self):
        self.at_finish.append(self.tokens)


@pytest.mark.parametrize("overlap", [True, False])
def test_token_counter_complete_at_finish(checkpoint, overlap):
    # Every generated token is counted (the first decode after an idle engine too), and the count
    # is complete when finished() is called, i.e. before the final response is emitted.
    m = CountingMetrics()
    e = Engine(EngineSettings(checkpoint=str(checkpoint), cpu_threads=1, max_seqs=4, max_context=256,
                              overlap=overlap), metrics=m)
    for n in (8, 1):
        r = e.generate(["Hello world"], SamplingParams(max_tokens=n, ignore_eos=True))[0]
        assert r["num_output_tokens"] == n
    assert m.at_finish == [8, 9]
    results = e.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    assert m.tokens == m.at_finish[-1] == 9 + sum(r["num_output_tokens"] for r in results)


def test_seeded_sampling_is_reproducible(engine):
    p = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate(["Hello world"], p)[0]["text"]
    # Same seed inside a batch of other (greedy and sampled) requests: same text.
    others = [SamplingParams(max_tokens=MAX_TOKENS), SamplingParams(max_tokens=7, temperature=0.7, seed=5)]
    batch = engine.generate(["Once upon a time", "Hello world", "a"], [others[0], p, others[1]])
    assert batch[1]["text"] == alone
    other_seed = engine.generate(["Hello world"], SamplingParams(**{**p.__dict__, "seed": 4321}))[0]["text"]
    assert other_seed != alone
    greedy = engine.generate(["Hello world"], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]["text"]
    assert alone != greedy


def test_top_k_1_is_greedy(engine):
    greedy = engine.generate(["Hello world"], SamplingParams(max_tokens=MAX_TOKENS))[0]["text"]
    k1 = engine.generate(["Hello world"], SamplingParams(max_tokens=MAX_TOKENS, temperature=2.0, top_k=1, seed=3))
    assert k1[0]["text"] == greedy


@pytest.mark.parametrize("stream", [False, True])
def test_stop_word_cut_exactly(engine, reference, stream):
    prompt = PROMPTS[1]
    full = reference[prompt][1]
    # A stop word spanning several tokens in the middle of the greedy text.
    start = len(full) // 3
    stop = full[start : start + 4]
    cut = full.find(stop)
    r = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, stop=(stop, "never-there")), stream=stream)[0]
    assert r["finish_reason"] == "stop"
    assert r["text"] == full[:cut]
    assert stop not in r["text"]


@pytest.mark.parametrize("overlap", [True, False])
def test_max_tokens_and_context_limit(checkpoint, overlap):
    e = make_engine(checkpoint, max_seqs=2, max_context=40, max_tokens_cap=100, overlap=overlap)
    r = e.generate(["Hello world"], SamplingParams(max_tokens=7, ignore_eos=True))[0]
    assert (r["num_output_tokens"], r["finish_reason"]) == (7, "length")
    r = e.generate(["Hello world"], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert r["num_input_tokens"] + r["num_output_tokens"] == 40 and r["finish_reason"] == "length"


@pytest.mark.parametrize("overlap", [True, False])
def test_cancellation_frees_the_slot(checkpoint, overlap):
    e = make_engine(checkpoint, max_seqs=1, max_context=256, overlap=overlap)
    seen = []
    cancelled = lambda: len(seen) >= 3  # noqa: E731 - the client goes away after 3 responses
    req = e.make_request("Hello", SamplingParams(max_tokens=200, ignore_eos=True), seen.append, is_cancelled=cancelled)
    e.submit(req)
    follow = []
    e.submit(e.make_request("world", SamplingParams(max_tokens=5, ignore_eos=True), follow.append))
    for _ in range(50):
        e.step()
    assert seen[-1].finished and seen[-1].finish_reason == "cancelled" and seen[-1].num_output_tokens < 10
    assert follow[-1].finished and follow[-1].num_output_tokens == 5  # it got the only slot
    assert e.pool.num_free == e.pool.usable and not e.running and not e.waiting


def test_failing_request_does_not_stop_others(checkpoint):
    e = make_engine(checkpoint, max_seqs=4, max_context=256)
    good = []

    def broken(o):
        raise RuntimeError("client went away")

    e.submit(e.make_request("Hello", SamplingParams(max_tokens=8, ignore_eos=True), broken))
    e.submit(e.make_request("Hello", SamplingParams(max_tokens=8, ignore_eos=True), good.append))
    for _ in range(20):
        e.step()
    assert good[-1].finished and good[-1].num_output_tokens == 8
    assert e.pool.num_free == e.pool.usable


def test_background_thread(checkpoint, reference):
    e = make_engine(checkpoint, max_seqs=4, max_context=256)
    e.start()
    try:
        r = e.generate(PROMPTS[:3], SamplingParams(max_tokens=MAX_TOKENS))
    finally:
        e.stop()
    assert [x["text"] for x in r] == [reference[p][1] for p in PROMPTS[:3]]


def test_start_freezes_the_heap_and_long_gc_pauses_are_logged(checkpoint, caplog):
    import gc
    import logging

    e = make_engine(checkpoint, max_seqs=2, max_context=256)
    e.start()
    try:
        # The loaded model, torch and transformers: far more objects than one request makes.
        assert gc.get_freeze_count() > 100_000
        e.gc_watch.threshold_s = 0.0  # every collection counts as long
        with caplog.at_level(logging.WARNING, logger="llm.gc_pauses"):
            gc.collect()
        assert "garbage collection stopped every thread for" in caplog.text
        assert e.stats().gc_pause_s > 0
        r = e.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True))  # still serves
        assert r[0]["num_output_tokens"] == 3
    finally:
        e.stop()
    assert gc.get_freeze_count() == 0 and e.gc_watch not in gc.callbacks


@pytest.mark.parametrize("field,params", [
    ("max_tokens", dict(max_tokens=0)),
    ("max_tokens", dict(max_tokens=10_000)),
    ("temperature", dict(max_tokens=4, temperature=-0.5)),
    ("top_k", dict(max_tokens=4, top_k=-1)),
    ("top_p", dict(max_tokens=4, top_p=0.0)),
    ("top_p", dict(max_tokens=4, top_p=1.5)),
    ("min_tokens", dict(max_tokens=4, min_tokens=5)),
    ("stop_words", dict(max_tokens=4, stop=("",))),
])
def test_bad_parameters_name_the_field(engine, field, params):
    with pytest.raises(ValueError, match=field):
        engine.make_request("Hello", SamplingParams(**params), lambda o: None)


def test_prompt_over_context_limit(engine):
    with pytest.raises(ValueError, match="text_input: prompt has 603 tokens; the context limit is 256"):
        engine.make_request("word " * 300, SamplingParams(max_tokens=4), lambda o: None)


@pytest.mark.parametrize("data,dtype", [([1, 2, -3], torch.long), ([7], torch.int32), ([0.5, 2.0], torch.float32),
                                        ([[1, 2], [3, 4]], torch.long), ([], torch.long), ([1.5, 2.7], torch.long)])
def test_host_tensor_equals_torch_tensor(data, dtype):
    from llm.device import host_tensor

    t = host_tensor(data, dtype)
    assert t.dtype == dtype and torch.equal(t, torch.tensor(data, dtype=dtype))


def test_held_back_prefix_of_stop_word():
    assert held_back("abc", ("cde",)) == 1
    assert held_back("abcd", ("cde", "bcdx")) == 3
    assert held_back("abc", ("xyz",)) == 0
    assert held_back("abc", ()) == 0


def test_settings_round_trip_and_errors_name_the_key():
    s = EngineSettings(max_seqs=3, cuda_graphs=False, metrics_interval_s=0.5)
    assert EngineSettings.from_parameters(s.to_parameters()) == s
    with pytest.raises(ValueError, match="unknown engine parameters"):
        EngineSettings.from_parameters({"max_seq": "3"})
    with pytest.raises(ValueError, match="block_size"):
        EngineSettings(block_size=12)
    with pytest.raises(ValueError, match="step_token_budget"):
        EngineSettings(max_seqs=64, step_token_budget=32)
    with pytest.raises(ValueError, match="cuda_graphs='maybe'"):
        EngineSettings.from_parameters({"cuda_graphs": "maybe"})
    assert parse_overrides(["max_seqs=8", "overlap=false"]) == {"max_seqs": 8, "overlap": False}
    with pytest.raises(ValueError, match="--set max_slots: unknown engine setting"):
        parse_overrides(["max_slots=8"])


def test_settings_from_config_resolves_the_checkpoint(tmp_path):
    from export.llm import export_default

    model_dir = export_default(repository=tmp_path)
    s = EngineSettings.from_config(model_dir)
    assert s.checkpoint == str(model_dir / "1" / "checkpoint") and s.max_seqs == 32


def test_tiny_checkpoint_tokenizer_matches_model(checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    from clients.chat import render

    tok, cfg = AutoTokenizer.from_pretrained(checkpoint), AutoConfig.from_pretrained(checkpoint)
    assert len(tok) == cfg.vocab_size == 1024
    ids = tok("Hello 🙂")["input_ids"]
    assert ids[0] == tok.bos_token_id == cfg.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 🙂"  # byte-level: every string round-trips
    assert tok.eos_token_id == cfg.eos_token_id
    text = render([{"role": "user", "content": "Hi"}], tok)
    assert text == "<|user|>\nHi<|end_of_text|>\n<|assistant|>\n"


def test_random_checkpoint_is_deterministic(checkpoint, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", "tiny")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (checkpoint / name).read_bytes(), name


def test_export_layout_and_up_to_date(tmp_path):
    from export import pbtxt
    from export.llm import DEFAULT_NAME, export_default, is_up_to_date

    model_dir = export_default(repository=tmp_path)
    config = pbtxt.read(model_dir)
    assert config.backend == "llm" and config.model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in config.parameters.items()}
    settings = EngineSettings.from_parameters(params)  # every parameter is a known engine setting
    assert (settings.max_seqs, settings.max_context) == (32, 512)
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["checkpoint"]  # the engine is the backend
    for rel in params["required_artifacts"].split(","):
        assert (model_dir / rel).exists(), rel
    assert is_up_to_date(model_dir, config)
    (model_dir / "1" / "llm").mkdir()  # a stale engine copy of an older export
    assert not is_up_to_date(model_dir, config)
    export_default(repository=tmp_path)
    assert not (model_dir / "1" / "llm").exists() and is_up_to_date(model_dir, config)
    assert model_dir.name == DEFAULT_NAME


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
    return model


@pytest.mark.parametrize("arch", ["Qwen2", "Mistral"])
def test_other_families_match_transformers(tmp_path, arch):
    from transformers import AutoTokenizer

    hf = _random_hf_checkpoint(tmp_path, arch)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    e = make_engine(tmp_path, max_seqs=4, max_context=256, step_token_budget=16)
    results = e.generate(PROMPTS[:4], SamplingParams(max_tokens=12))
    for p, r in zip(PROMPTS[:4], results):
        ids = tok(p, return_tensors="pt")
        gen = hf.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert r["text"] == tok.decode(gen, skip_special_tokens=True), (arch, p)


@pytest.mark.parametrize("overlap", [True, False])
def test_eos_min_tokens_ignore_eos(checkpoint, overlap):
    e = make_engine(checkpoint, max_seqs=4, max_context=256, overlap=overlap)
    eos = e.eos_ids[0]

    forward = e.runner.forward

    def eos_always(*a, **kw):  # the model now always prefers EOS
        logits, sampled = forward(*a, **kw)
        logits = logits.clone()
        logits[:, eos] = 1e4
        return logits, sampled

    e.runner.forward = eos_always
    r = e.generate(["Hello"] * 3, [SamplingParams(max_tokens=10), SamplingParams(max_tokens=10, min_tokens=5),
                                   SamplingParams(max_tokens=10, ignore_eos=True)])
    assert [(x["num_output_tokens"], x["finish_reason"]) for x in r] == [(1, "stop"), (6, "stop"), (10, "length")]
    assert r[0]["text"] == "" and r[2]["text"] == ""  # EOS is a special token: no text


def test_waiting_list_is_bounded_and_refusals_are_overloaded(checkpoint):
    """Bounded admission: past max_waiting a request is refused at once as retryable overload; every
    request gets exactly one final response; those admitted complete."""
    e = make_engine(checkpoint, max_seqs=2, max_context=256, max_waiting=3)
    outs = [[] for _ in range(8)]
    for o in outs:
        e.submit(e.make_request("Hello", SamplingParams(max_tokens=4, ignore_eos=True), o.append))
    for _ in range(40):
        e.step()
    finals = [o[-1] for o in outs]
    assert all(o.finished for o in finals) and all(sum(x.finished for x in o) == 1 for o in outs)
    refused = [o for o in finals if o.finish_reason == "overloaded"]
    assert len(refused) == 8 - 2 - 3 and all("max_waiting" in o.error for o in refused)
    assert all(o.num_output_tokens == 4 for o in finals if o.finish_reason != "overloaded")
    assert e.settings.replace(max_waiting=0).waiting_limit == 4 * 2


def test_queue_time_is_bounded(checkpoint):
    e = make_engine(checkpoint, max_seqs=1, max_context=256, max_queue_time_s=0.05)
    first, second = [], []
    e.submit(e.make_request("Hello", SamplingParams(max_tokens=200, ignore_eos=True), first.append))
    e.step()
    e.submit(e.make_request("Hello", SamplingParams(max_tokens=2), second.append))
    e.step()
    import time

    time.sleep(0.1)
    e.step()
    assert second[-1].finish_reason == "overloaded" and "max_queue_time_s" in second[-1].error
    assert not first[-1].finished  # the running request is not touched


@pytest.mark.parametrize("kind", ["error", "oom"])
def test_injected_fault_fails_its_batch_only(checkpoint, monkeypatch, kind):
    monkeypatch.setenv("LLM_FAULT_INJECTION", f"__boom__={kind}")
    e = make_engine(checkpoint, max_seqs=4, max_context=256)
    good, bad = [], []
    e.submit(e.make_request("Hello", SamplingParams(max_tokens=6, ignore_eos=True), good.append))
    for _ in range(2):
        e.step()
    e.submit(e.make_request("x __boom__ y", SamplingParams(max_tokens=6), bad.append))
    for _ in range(20):
        e.step()
    assert bad[-1].finished and bad[-1].finish_reason == "error" and "internal engine error" in bad[-1].error
    assert good[-1].finished and good[-1].num_output_tokens == 6 and good[-1].error is None
    after = []
    e.submit(e.make_request("Hello", SamplingParams(max_tokens=3, ignore_eos=True), after.append))
    for _ in range(10):
        e.step()
    assert after[-1].num_output_tokens == 3 and e.pool.num_free == e.pool.usable


# ---- paged KV cache: block pool, prefix cache, preemption, mixed batches ----------------------------

def test_block_pool_refcounts_prefix_cache_and_lru_eviction():
    pool = BlockPool(num_blocks=5, block_size=2)  # block 0 reserved: 4 usable
    a = [pool.allocate(), pool.allocate()]
    assert 0 not in a and pool.num_free == 2
    cid = pool.register(a[0], 0, [7, 8])
    pool.register(a[1], cid, [9, 10])
    pool.release(a)
    assert pool.num_free == 4  # cached but evictable
    hit, last = pool.lookup([7, 8, 9, 10, 11], max_tokens=4)
    assert hit == a and last != 0 and pool.ref[a[0]] == 1
    assert pool.lookup([7, 8, 9, 99], max_tokens=4)[0] == [a[0]]  # the second block differs
    assert pool.lookup([1, 2], max_tokens=2)[0] == []
    pool.release(hit)
    pool.release([a[0]])
    taken = [pool.allocate() for _ in range(4)]  # evicts the cached blocks (tail first)
    assert sorted(taken) == [1, 2, 3, 4] and pool.lookup([7, 8, 9, 10], max_tokens=4)[0] == []
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate()
    # A key built on an evicted parent never matches again, even if the block id is reused.
    pool.release(taken)
    with pytest.raises(AssertionError, match="double release"):
        pool.release([taken[0]])


def test_no_prefix_cache_when_disabled():
    pool = BlockPool(num_blocks=4, block_size=2, prefix_caching=False)
    b = pool.allocate()
    assert pool.register(b, 0, [1, 2]) == 0
    pool.release([b])
    assert pool.lookup([1, 2, 3], max_tokens=2)[0] == [] and pool.num_free == 3


def _long_prompts():
    return ["What is machine learning? " * 12, "Once upon a time, there was a small model " * 8,
            "Hello world " * 30, "def main(): print(0) " * 15]


@pytest.fixture(scope="module")
def long_reference(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = {}
    for p in _long_prompts():
        ids = tok(p, return_tensors="pt")
        gen = hf.generate(**ids, max_new_tokens=40, do_sample=False)[0, ids["input_ids"].shape[1]:]
        out[p] = tok.decode(gen, skip_special_tokens=True)
    return out


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("graphs", [False, True])
def test_preemption_when_blocks_run_out_keeps_outputs_exact(checkpoint, long_reference, prefix_caching, overlap, graphs):
    # A pool of 70 blocks x 4 tokens holds fewer than two of these sequences (up to 161 tokens each):
    # running sequences are preempted and recomputed, and no request fails for lack of KV.
    # graphs: decode steps through the CUDA-graph input path (emulated), where a recomputed sequence's
    # known token sits next to in-flight ones.
    e = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=32, block_size=4,
                    kv_cache_budget_mb=70 * 2048 / 2**20, overlap=overlap, prefix_caching=prefix_caching)
    if graphs:
        emulate_decode_graphs(e)
    assert e.pool.usable == 70
    prompts = _long_prompts() * 2
    results = e.generate(prompts, SamplingParams(max_tokens=40))
    assert [r["text"] for r in results] == [long_reference[p] for p in prompts]
    assert all(r["error"] is None for r in results)
    assert e.scheduler.preemptions > 0
    assert e.pool.num_free == e.pool.usable and not e.running and not e.waiting


def test_prefix_cache_hits_and_outputs_identical(checkpoint, long_reference):
    prompts = _long_prompts()
    cached = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=64)
    first = cached.generate(prompts, SamplingParams(max_tokens=40))
    assert cached.scheduler.prefix_hit == 0
    again = cached.generate(prompts, SamplingParams(max_tokens=40))  # the same prompts: prefilled from cache
    bs = cached.settings.block_size
    prompt_lens = [r["num_input_tokens"] for r in first]
    assert cached.scheduler.prefix_hit == sum((n - 1) // bs * bs for n in prompt_lens)
    uncached = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=64, prefix_caching=False)
    plain = uncached.generate(prompts, SamplingParams(max_tokens=40))
    assert [r["text"] for r in again] == [r["text"] for r in first] == [r["text"] for r in plain] \
        == [long_reference[p] for p in prompts]
    assert uncached.scheduler.prefix_hit == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_every_full_computed_block_is_registered_after_each_step(checkpoint, overlap):
    # Registration is tried only where a block can have filled (a token computed or appended at a
    # block boundary, or a prefill chunk): after every step no running sequence has a full, computed,
    # known block left unregistered. With overlap a token is computed before it is appended; without,
    # after: both orders are covered.
    e = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=16, block_size=4, overlap=overlap)
    for p in ["Hello", "What is machine learning? " * 3, "Count to ten"]:
        e.submit(e.make_request(p, SamplingParams(max_tokens=30, ignore_eos=True), lambda o: None))
    checked = 0
    while e.has_work:
        e.step()
        for q in e.running:
            assert q.num_registered == min(q.num_computed, len(q.tokens)) // 4, (q.num_computed, len(q.tokens))
            checked += q.num_registered
    assert checked > 100


def test_shared_system_prompt_is_prefilled_once(checkpoint):
    system = "You are a helpful assistant. Answer briefly and exactly. " * 3
    e = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=512)
    e.generate([system + "Hi"], SamplingParams(max_tokens=2))
    e.generate([system + q for q in ("What is ML?", "Tell a story", "Count to 3")], SamplingParams(max_tokens=2))
    shared = len(e.tokenizer(system)["input_ids"]) // e.settings.block_size * e.settings.block_size
    assert e.scheduler.prefix_hit >= 3 * (shared - e.settings.block_size)


def test_long_prompt_is_mixed_with_running_decodes(checkpoint):
    # A long prompt arrives while a stream decodes: with a small step budget its prefill is chunked
    # and every step still carries the running stream's decode token.
    e = make_engine(checkpoint, max_seqs=4, max_context=256, step_token_budget=16)
    short = []
    e.submit(e.make_request("Hello", SamplingParams(max_tokens=30, ignore_eos=True), short.append))
    for _ in range(3):
        e.step()
    before = short[-1].num_output_tokens
    long_out = []
    e.submit(e.make_request("What is machine learning? " * 12, SamplingParams(max_tokens=3, ignore_eos=True),
                            long_out.append))
    steps = 0
    while not long_out or long_out[-1].num_output_tokens == 0:
        e.step()
        steps += 1
    assert steps >= 100 // 16  # the prompt took several chunks ...
    assert short[-1].num_output_tokens - before >= steps - 2  # ... and the stream got a token in each step


def test_sequence_crossing_many_blocks_matches_transformers(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = "Hello world! " * 20
    ids = tok(prompt, return_tensors="pt")
    gen = hf.generate(**ids, max_new_tokens=150, do_sample=False, min_new_tokens=150)[0, ids["input_ids"].shape[1]:]
    e = make_engine(checkpoint, max_seqs=2, max_context=256, block_size=2, step_token_budget=8)
    r = e.generate([prompt], SamplingParams(max_tokens=150, min_tokens=150))[0]
    assert r["num_input_tokens"] + 150 > 100 * 2  # over a hundred blocks of 2 tokens
    assert r["text"] == tok.decode(gen, skip_special_tokens=True)


def test_device_idle_is_zero_without_device_events(engine):
    """CPU steps record no events: the critical-path counter stays 0 while host time accrues."""
    before = engine.stats()
    engine.generate(["Hello world"], SamplingParams(max_tokens=4))
    after = engine.stats()
    assert after.steps > before.steps and after.host_s > before.host_s
    assert after.device_idle_s == before.device_idle_s == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overlap", [True, False])
def test_device_idle_counts_the_host_between_steps(checkpoint, monkeypatch, overlap):
    """A host that takes 20 ms to schedule each step leaves the GPU idle about that long between steps;
    the counter measures that gap on the device (CUDA events), with or without overlapped steps."""
    import time

    e = Engine(EngineSettings(checkpoint=str(checkpoint), max_seqs=2, max_context=128, kv_cache_budget_mb=16,
                              compile=False, overlap=overlap), device="cuda")
    e.generate(["Hello world"], SamplingParams(max_tokens=4))  # warm: graphs, kernels
    schedule = e.scheduler.schedule

    def slow_schedule():
        time.sleep(0.02)
        return schedule()

    monkeypatch.setattr(e.scheduler, "schedule", slow_schedule)
    before = e.stats()
    e.generate(["Hello world"], SamplingParams(max_tokens=12, ignore_eos=True))
    after = e.stats()
    steps, idle = after.steps - before.steps, after.device_idle_s - before.device_idle_s
    # Every step but the first follows a step; a tiny model's step is far shorter than the sleep.
    assert 0.018 * (steps - 2) <= idle <= 0.03 * steps, (steps, idle)
