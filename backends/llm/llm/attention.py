"""Attention over the paged KV cache.

Cache layout (llm/kv_cache.py): k_cache, v_cache = [num_blocks, block_size, KVH, D]. Shapes below:
H query heads, KVH key/value heads (n_rep = H // KVH query heads share one, as HF's repeat_kv: query
head h uses kv head h // n_rep), D head_dim.

- `decode_torch`: single-token queries (decode rows) against their sequences' blocks: gathers the
  blocks, masks by length, SDPA. The reference and the CPU path; on GPU it is the fallback.
- `decode_triton`: the same as an OpenAI-Triton kernel (split-KV flash decoding: each program walks
  a slice of one sequence's blocks for one kv head, with all n_rep query heads of that kv head in one
  tile; a small torch reduction merges the slices). Reads seq_lens on the device, so one CUDA graph
  per batch bucket serves every length.
- `prefill`: a chunk of one sequence's tokens [start, start + n): causal SDPA (flash attention on
  GPU) over the chunk alone when it starts the sequence, else over the gathered cached prefix + chunk
  with bottom-right causal alignment.
- `prefill_grouped`: many short chunks of one step (each with or without a cached prefix) in one
  padded SDPA call with an explicit mask, keys read from the cache (`group_prefill` picks the groups).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from llm.device import to_device
from llm.kv_cache import NULL_BLOCK

try:  # OpenAI Triton ships with CUDA builds of torch; CPU-only hosts may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the host
    triton = None


def decode_torch(q, k_cache, v_cache, block_table, seq_lens, scale: float) -> torch.Tensor:
    """q [B, H, D]; block_table [B, nb] (blocks of each row, padded with any valid id); seq_lens [B]
    (>= 1) -> [B, H, D]. Reads nb * block_size positions per row, masked to seq_lens."""
    B, H, D = q.shape
    _, bs, KVH, _ = k_cache.shape
    nb = block_table.shape[1]
    bt = block_table.long()
    k = k_cache[bt].view(B, nb * bs, KVH, D).transpose(1, 2)  # [B, KVH, L, D]
    v = v_cache[bt].view(B, nb * bs, KVH, D).transpose(1, 2)
    allowed = torch.arange(nb * bs, device=q.device)[None, :] < seq_lens[:, None]  # [B, L]
    y = F.scaled_dot_product_attention(q.view(B, KVH, H // KVH, D), k, v, attn_mask=allowed[:, None, None, :],
                                       scale=scale)  # [B, KVH, n_rep, D]
    return y.reshape(B, H, D)


def prefill(q, k, v, k_cache, v_cache, block_row, start: int, scale: float) -> torch.Tensor:
    """q [n, H, D], k/v [n, KVH, D] (this chunk's, already written to the cache at positions
    start..start+n-1; used only when start == 0, else None will do); block_row
    [>= ceil((start+n)/block_size)] -> [n, H, D]."""
    n, H, D = q.shape
    KVH = k_cache.shape[2]
    if start == 0:  # keys are this chunk only: causal attention
        kk, vv, causal = k, v, {"is_causal": True}
    else:  # the cached prefix + this chunk, gathered from the cache
        L = start + n
        bs = k_cache.shape[1]
        nb = -(-L // bs)
        row = block_row[:nb].long()
        kk, vv = k_cache[row].view(nb * bs, KVH, D)[:L], v_cache[row].view(nb * bs, KVH, D)[:L]
        # Causal with the queries at the last n of L positions (bottom-right aligned): flash attention
        # on GPU. An explicit mask kept SDPA off the flash kernel: with 128 of 2048 tokens cached, idle
        # TTFT was 70 ms on the H200 against 59 ms for the whole prompt (two device calls).
        causal = {"attn_mask": causal_lower_right(n, L)}
    # GQA inside SDPA (query head h uses kv head h // n_rep, as HF's repeat_kv): flash reads the KVH
    # heads as they are; expanding them first cost 1.7 ms of copies in a 2048-token 8B prefill (H200).
    y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None], vv.transpose(0, 1)[None],
                                       scale=scale, enable_gqa=H != KVH, **causal)  # [1, H, n, D]
    return y[0].transpose(0, 1)


# Grouped prefill: a step's short prompt chunks attend in one padded call per layer instead of one call
# each. Per call, the Python and launch overhead (~0.1 ms) times chunks x layers made prefill bound by the
# host: 64 chunks of 16 tokens after a cached prefix took 235 ms of host work per step on the H100, for
# ~25 ms of GPU work (results/gpu/engine_v2/notes.md, twelfth round). Long chunks keep `prefill` (flash
# attention, no padding). Caps bound each group's padding and its transient memory:
GROUP_MAX_QUERY = 256  # a chunk of more tokens attends alone
GROUP_MAX_KEYS = 16384  # per group: chunks x the longest key length (the gathered keys and values)
GROUP_MAX_SCORES = 1 << 20  # per group: chunks x longest chunk x longest key length (the mask)


@dataclass
class PrefillGroup:
    """Prefill chunks of G sequences padded to one attention call (built once per step, read by every
    layer). Q: the longest chunk; K: the longest key length in whole blocks; R: query heads per kv head."""

    q_rows: torch.Tensor  # [G, Q] int64: each chunk's flat token rows, padded with its last row
    key_slots: torch.Tensor  # [G, K] int64: each sequence's cache slots for positions 0..K-1 (NULL_BLOCK past its table)
    mask: torch.Tensor  # [G, 1, R * Q, K] bool: key j visible to query i: j <= start + i (pad rows: as the last)
    src: torch.Tensor  # [T] int64: the real queries' rows in the call's flattened [G * Q] output
    dest: torch.Tensor  # [T] int64: their flat token rows


def group_prefill(chunks: list[tuple[int, int, int, list[int]]], block_size: int) -> tuple[list[list[int]], list[int]]:
    """chunks: (offset, n, start, blocks) per prefill chunk -> (groups of >= 2 chunk indices, the indices
    that attend alone). Chunks are taken shortest keys first so that a group pads little."""
    groups, alone, cur = [], [], []
    qmax = kmax = 0
    for i in sorted(range(len(chunks)), key=lambda i: chunks[i][2] + chunks[i][1]):
        _, n, start, _ = chunks[i]
        k = -(-(start + n) // block_size) * block_size
        if n > GROUP_MAX_QUERY or k > GROUP_MAX_KEYS or n * k > GROUP_MAX_SCORES:
            alone.append(i)
            continue
        q2, k2 = max(qmax, n), max(kmax, k)
        if cur and ((len(cur) + 1) * k2 > GROUP_MAX_KEYS or (len(cur) + 1) * q2 * k2 > GROUP_MAX_SCORES):
            groups.append(cur)
            cur, q2, k2 = [], n, k
        cur.append(i)
        qmax, kmax = q2, k2
    groups.append(cur)
    alone += [g[0] for g in groups if len(g) == 1]
    return [g for g in groups if len(g) > 1], sorted(alone)


def prefill_group_inputs(chunks: list[tuple[int, int, int, list[int]]], block_size: int, n_rep: int,
                         device: torch.device) -> PrefillGroup:
    """The index tensors and mask of one group of (offset, n, start, blocks) chunks."""
    G = len(chunks)
    Q = max(n for _, n, _, _ in chunks)
    nb = max(len(b) for _, _, _, b in chunks)
    info = to_device([c[i] for i in range(3) for c in chunks], device).view(3, G)  # offset, n, start
    table = to_device([x for *_, b in chunks for x in b + [NULL_BLOCK] * (nb - len(b))], device).view(G, nb)
    off, n, start = info[0], info[1], info[2]
    qi = torch.minimum(torch.arange(Q, device=device)[None, :], n[:, None] - 1)  # [G, Q]
    key_slots = (table[:, :, None] * block_size + torch.arange(block_size, device=device)).view(G, nb * block_size)
    visible = torch.arange(nb * block_size, device=device) <= (start[:, None] + qi)[:, :, None]  # [G, Q, K]
    src, dest = [], []
    for g, (o, c, _, _) in enumerate(chunks):
        src += range(g * Q, g * Q + c)
        dest += range(o, o + c)
    return PrefillGroup(off[:, None] + qi, key_slots, visible.repeat(1, n_rep, 1)[:, None],
                        to_device(src, device), to_device(dest, device))


def plan_prefill(chunks: list[tuple[int, int, int, list[int]]], block_size: int, n_rep: int,
                 device: torch.device) -> tuple[list[PrefillGroup], list[tuple]]:
    """A step's (offset, n, start, blocks) prefill chunks -> (their groups, the chunks that attend alone
    as (offset, n, start, block row on the device)): model.Batch's `groups` and `chunks`."""
    grouped, alone = group_prefill(chunks, block_size)
    groups = [prefill_group_inputs([chunks[i] for i in g], block_size, n_rep, device) for g in grouped]
    return groups, [(o, n, s, to_device(b, device)) for o, n, s, b in (chunks[i] for i in alone)]


def prefill_grouped(q, k_cache, v_cache, g: PrefillGroup, scale: float) -> torch.Tensor:
    """q [N, H, D] (the step's flat queries) -> [T, H, D] for the group's real query rows (g.dest order).
    The R query heads of a kv head are folded into the query length, so any SDPA backend reads the KVH
    heads as they are (no expanded copies), with the explicit mask."""
    G, Q = g.q_rows.shape
    _, H, D = q.shape
    KVH = k_cache.shape[2]
    R = H // KVH
    qq = q[g.q_rows].view(G, Q, KVH, R, D).permute(0, 2, 3, 1, 4).reshape(G, KVH, R * Q, D)
    kk = k_cache.view(-1, KVH, D)[g.key_slots].transpose(1, 2)  # [G, KVH, K, D]
    vv = v_cache.view(-1, KVH, D)[g.key_slots].transpose(1, 2)
    y = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=g.mask, scale=scale)  # [G, KVH, R * Q, D]
    return y.view(G, KVH, R, Q, D).permute(0, 3, 1, 2, 4).reshape(G * Q, H, D)[g.src]


# ---------------------------------------------------------------------------------------------- Triton

if triton is not None:

    # The block table's row stride varies with the batch's longest sequence in eager steps (and is 1
    # for one-block tables): not specialized on, so no step ever waits for a JIT compile.
    @triton.jit(do_not_specialize=["s_btb"])
    def _decode_kernel(Q, K, V, BT, LENS, ACC, M, L, scale,
                       s_qb, s_qh, s_kb, s_kt, s_kh, s_btb, s_ab, s_ah, s_as, s_mb, s_mh,
                       N_REP: tl.constexpr, N_REP_P: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                       TILE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(LENS + b)
        per_split = tl.cdiv(tl.cdiv(seq_len, TILE), SPLITS) * TILE  # positions per split, whole tiles
        lo = split * per_split
        hi = tl.minimum(lo + per_split, seq_len)
        r = tl.arange(0, N_REP_P)
        d = tl.arange(0, D)
        head = kvh * N_REP + r
        rmask = r < N_REP
        q = tl.load(Q + b * s_qb + head[:, None] * s_qh + d[None, :], mask=rmask[:, None], other=0.0)
        m_i = tl.full([N_REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([N_REP_P], tl.float32)
        acc = tl.zeros([N_REP_P, D], tl.float32)
        t = tl.arange(0, TILE)
        for p0 in range(lo, hi, TILE):
            pos = p0 + t
            valid = pos < hi
            blk = tl.load(BT + b * s_btb + pos // BS, mask=valid, other=0)
            off = blk.to(tl.int64) * s_kb + (pos % BS) * s_kt + kvh * s_kh
            k = tl.load(K + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # [TILE, D]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [N_REP_P, TILE] fp32
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + off[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if SPLITS == 1:  # normalized, in the output's dtype: no second pass
            out = acc / l_i[:, None]
            tl.store(ACC + b * s_ab + head[:, None] * s_ah + d[None, :], out.to(ACC.dtype.element_ty), mask=rmask[:, None])
        else:
            tl.store(ACC + b * s_ab + head[:, None] * s_ah + split * s_as + d[None, :], acc, mask=rmask[:, None])
            tl.store(M + b * s_mb + head * s_mh + split, m_i, mask=rmask)
            tl.store(L + b * s_mb + head * s_mh + split, l_i, mask=rmask)

    @triton.jit
    def _merge_splits_kernel(ACC, M, L, OUT, s_ab, s_ah, s_as, s_mb, s_mh, s_ob, s_oh,
                             SPLITS: tl.constexpr, D: tl.constexpr):
        # One program per (row, head): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = exp(m_s - max m).
        b = tl.program_id(0)
        h = tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        m = tl.load(M + b * s_mb + h * s_mh + sp)
        l_ = tl.load(L + b * s_mb + h * s_mh + sp)
        w = tl.exp(m - tl.max(m, 0))  # empty splits (m = -inf) weigh 0
        acc = tl.load(ACC + b * s_ab + h * s_ah + sp[:, None] * s_as + d[None, :])
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_ * w, 0)
        tl.store(OUT + b * s_ob + h * s_oh + d, out.to(OUT.dtype.element_ty))

    @triton.jit
    def _rope_write_kernel(QKV, COS, SIN, POS, SLOTS, Q_OUT, K_CACHE, V_CACHE,
                           s_xn, s_xh, s_qn, s_qh, s_cn, s_ck, s_ch,
                           H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, HB: tl.constexpr):
        # One program per (token, HB heads of q|k|v): RoPE on q and k heads (HF rotate_half convention:
        # the two halves of a head rotate together), q to Q_OUT, k and v to their cache slot. A head's
        # destination is chosen by masked stores (one of the three is live per head).
        n = tl.program_id(0)
        hh = tl.program_id(1) * HB + tl.arange(0, HB)  # [HB] head index in q|k|v
        half = tl.arange(0, D // 2)
        live = (hh < H + 2 * KVH)[:, None]
        src = QKV + n * s_xn + hh[:, None] * s_xh + half[None, :]
        x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)  # [HB, D/2]
        x2 = tl.load(src + D // 2, mask=live, other=0.0).to(tl.float32)
        p = tl.load(POS + n)
        slot = tl.load(SLOTS + n).to(tl.int64)
        c = tl.load(COS + p * s_cn + half).to(tl.float32)[None, :]
        s_ = tl.load(SIN + p * s_cn + half).to(tl.float32)[None, :]
        rotate = (hh < H + KVH)[:, None]
        y1 = tl.where(rotate, x1 * c - x2 * s_, x1)
        y2 = tl.where(rotate, x2 * c + x1 * s_, x2)
        is_q = (hh < H)[:, None]
        is_k = ((hh >= H) & (hh < H + KVH))[:, None]
        is_v = (hh >= H + KVH)[:, None] & live
        q_dst = Q_OUT + n * s_qn + hh[:, None] * s_qh + half[None, :]
        k_dst = K_CACHE + slot * s_ck + (hh - H)[:, None] * s_ch + half[None, :]
        v_dst = V_CACHE + slot * s_ck + (hh - H - KVH)[:, None] * s_ch + half[None, :]
        tl.store(q_dst, y1.to(Q_OUT.dtype.element_ty), mask=is_q)
        tl.store(q_dst + D // 2, y2.to(Q_OUT.dtype.element_ty), mask=is_q)
        tl.store(k_dst, y1.to(K_CACHE.dtype.element_ty), mask=is_k)
        tl.store(k_dst + D // 2, y2.to(K_CACHE.dtype.element_ty), mask=is_k)
        tl.store(v_dst, y1.to(V_CACHE.dtype.element_ty), mask=is_v)
        tl.store(v_dst + D // 2, y2.to(V_CACHE.dtype.element_ty), mask=is_v)


# rope_and_write: from this many tokens, 16 heads per program instead of one.
ROPE_HEADS_PER_PROGRAM_FROM = 64


def num_splits(batch: int, kv_heads: int, sm_count: int) -> int:
    """Split the keys when batch x kv heads alone would leave most SMs idle (batch 1: 8 programs);
    a power of two (the merge kernel's tile)."""
    n = max(1, min(16, (2 * sm_count) // max(1, batch * kv_heads)))
    return 1 << (n.bit_length() - 1)


# torch.compile'd layers (llm/runner.py) call the two kernel launchers below as they are, outside
# inductor's graph: tracing these user kernels failed on torch 2.11 (a float argument typed fp64, then an
# illegal address), and inductor would only relaunch the same kernels. Measured on the H200 with them
# outside the graph: 8B decode 5.32 -> 4.93 ms per step at batch 1.
@torch.compiler.disable
def decode_triton(q, k_cache, v_cache, block_table, seq_lens, scale: float, splits: int = 1) -> torch.Tensor:
    """Same contract as decode_torch (block_table int32, seq_lens int32 on the device)."""
    B, H, D = q.shape
    _, bs, KVH, _ = k_cache.shape
    n_rep = H // KVH
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if splits == 1:  # the kernel writes the normalized output
        acc, m, l_ = out.unsqueeze(2), out, out
    else:
        acc = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
        m = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
    tile = max(16, min(64, bs * 4))
    _decode_kernel[(B, KVH, splits)](
        q, k_cache, v_cache, block_table, seq_lens, acc, m, l_, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        N_REP=n_rep, N_REP_P=max(16, triton.next_power_of_2(n_rep)), D=D, BS=bs, TILE=tile, SPLITS=splits,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    if splits > 1:
        _merge_splits_kernel[(B, H)](acc, m, l_, out, acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0),
                                     m.stride(1), out.stride(0), out.stride(1), SPLITS=splits, D=D, num_warps=1)
    return out


@torch.compiler.disable
def rope_and_write(qkv, cos_table, sin_table, pos, slots, k_cache, v_cache, H: int, KVH: int) -> torch.Tensor:
    """One kernel for RoPE on q and k, and the k/v cache writes. qkv [N, H+2KVH, D]; cos/sin tables
    [max_context, D] (HF layout: both halves equal); pos, slots [N] -> q [N, H, D] (rotated)."""
    N, _, D = qkv.shape
    q = torch.empty(N, H, D, dtype=qkv.dtype, device=qkv.device)
    kc, vc = k_cache.view(-1, KVH, D), v_cache.view(-1, KVH, D)
    # Decode batches: a head per program (enough programs to fill the GPU). Prompt chunks: 16 heads per
    # program; a head per program took 1.9 ms of a 2048-token 8B prefill on the H200 (98k one-warp programs).
    hb = 1 if N < ROPE_HEADS_PER_PROGRAM_FROM else 16
    _rope_write_kernel[(N, triton.cdiv(H + 2 * KVH, hb))](
        qkv, cos_table, sin_table, pos, slots, q, kc, vc,
        qkv.stride(0), qkv.stride(1), q.stride(0), q.stride(1), cos_table.stride(0), kc.stride(0), kc.stride(1),
        H=H, KVH=KVH, D=D, HB=hb, num_warps=1 if hb == 1 else 4)
    return q
