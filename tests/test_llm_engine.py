"""The LLM engine in-process (no server): exact against transformers, batching, streaming, sampling,
stops, limits, cancellation, admission, faults, validation, step timing. The tiny random-weight Llama
and its transformers reference are session fixtures (conftest.py)."""
from __future__ import annotations

import pytest
import torch

from llm.engine import Engine, Metrics
from llm.sampling import SamplingParams
from llm.settings import EngineSettings
from tests.llm_helpers import MAX_TOKENS, PROMPTS, make_engine


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
