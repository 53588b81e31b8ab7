"""The scheduler over the paged KV pool: block refcounts and the prefix cache (LRU), preemption when
blocks run out, prefix-cache registration, chunked prefill mixed with decodes, long sequences; every
output exact against transformers."""
from __future__ import annotations

import pytest

from llm.kv_cache import BlockPool
from llm.sampling import SamplingParams
from tests.llm_helpers import emulate_decode_graphs, hf_greedy, make_engine


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
    return {p: text for p, (_, text) in hf_greedy(checkpoint, _long_prompts(), 40).items()}


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
    prompt = "Hello world! " * 20
    _, expected = hf_greedy(checkpoint, [prompt], 150, min_new_tokens=150)[prompt]
    e = make_engine(checkpoint, max_seqs=2, max_context=256, block_size=2, step_token_budget=8)
    r = e.generate([prompt], SamplingParams(max_tokens=150, min_tokens=150))[0]
    assert r["num_input_tokens"] + 150 > 100 * 2  # over a hundred blocks of 2 tokens
    assert r["text"] == expected
