"""Python-based backend `torch_encoder`: a BERT-family sentence encoder (MiniLM) in torch fp16 on
the GPU with CUDA graphs, returning mean-pooled, L2-normalised sentence embeddings (what
sentence-transformers' all-MiniLM-L6-v2 computes).

The GPU path: Triton's dynamic batcher merges requests; execute() concatenates them, pads to a
(batch, sequence) bucket and replays the CUDA graph captured for that bucket (encoder + pooling +
normalisation in one graph), so a batch costs one graph launch instead of ~100 kernel launches.
On CPU (KIND_CPU) the same module runs eagerly in fp32.

config.pbtxt parameters (written by export/encoder_torch.py):
  checkpoint      dir with config.json (+ model.safetensors) relative to the version dir, or absolute
  random_weights  "true": build the architecture from config.json with random weights (benchmarks:
                  speed does not depend on weight values)
  seq_buckets     e.g. "32,64,128": padded sequence lengths with a captured graph each
  cuda_graphs     "true"/"false"
  compile         "true": torch.compile (inductor, max-autotune) the full-batch buckets (batch = max_batch_size,
                  every sequence bucket) before capturing their graphs: +13% GPU throughput at 256x128,
                  minutes of autotuning on the first start; smaller batches stay uncompiled. Restarts
                  reuse inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, set by the launcher:
                  serve/environment.py), which skips the autotuning
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embedding"


def powers_of_two_upto(n: int) -> list[int]:
    out, b = [], 1
    while b < n:
        out.append(b)
        b *= 2
    return out + [n]


def bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Encoder(torch.nn.Module):
    """HF BertModel -> masked mean pooling -> L2 normalisation. ids/mask/types: [B, S] int64."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, mask, types):
        h = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state  # [B, S, H]
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)  # [B, H]
        return torch.nn.functional.normalize(pooled.float(), dim=-1)  # fp32 [B, H]


def bind_device(args) -> torch.device:
    """This instance's device from Triton's args (export/placement.py instance_device), made current:
    a KIND_GPU instance on GPU 1 would otherwise capture its CUDA graphs on streams and pools of GPU 0,
    the default current device of every stub process."""
    if args["model_instance_kind"] != "GPU":
        return torch.device("cpu")
    device = torch.device("cuda", int(args["model_instance_device_id"]))
    torch.cuda.set_device(device)
    return device


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoConfig, AutoModel

        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        ckpt = Path(params.get("checkpoint", "checkpoint"))
        ckpt = ckpt if ckpt.is_absolute() else version_dir / ckpt
        self.device = bind_device(args)
        gpu = self.device.type == "cuda"
        dtype = torch.float16 if gpu else torch.float32
        hf_config = AutoConfig.from_pretrained(ckpt)
        if params.get("random_weights", "false") == "true":
            torch.manual_seed(0)
            bert = AutoModel.from_config(hf_config, attn_implementation="sdpa", add_pooling_layer=False)
        else:
            bert = AutoModel.from_pretrained(ckpt, attn_implementation="sdpa", add_pooling_layer=False)
        self.model = Encoder(bert).to(self.device, dtype).eval().requires_grad_(False)
        self.vocab = hf_config.vocab_size
        self.max_batch = int(cfg["max_batch_size"])
        self.batch_buckets = powers_of_two_upto(self.max_batch)
        self.seq_buckets = [int(s) for s in params.get("seq_buckets", "32,64,128").split(",")]
        self.use_graphs = gpu and params.get("cuda_graphs", "true") == "true"
        self.compiled = None
        if self.use_graphs and params.get("compile", "false") == "true":
            self.compiled = torch.compile(self.model, mode="max-autotune-no-cudagraphs", dynamic=False)
        self.graphs = {}
        if self.use_graphs:
            B, S = self.max_batch, self.seq_buckets[-1]
            self.static_in = [torch.zeros(B, S, dtype=torch.long, device=self.device) for _ in INPUTS]
            self.pool = None
            for b in reversed(self.batch_buckets):  # largest first: later graphs reuse its pool
                for s in reversed(self.seq_buckets):
                    self._graph(b, s)

    def _graph(self, b: int, s: int):
        key = (b, s)
        if key not in self.graphs:
            ids, mask, types = (x[:b, :s] for x in self.static_in)
            mask.fill_(1)
            fn = self.compiled if (self.compiled is not None and b == self.max_batch) else self.model
            with torch.inference_mode():
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(3):  # compiled: the first call compiles and autotunes
                        fn(ids, mask, types)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    out = fn(ids, mask, types)
                self.pool = g.pool()
            self.graphs[key] = (g, out)
        return self.graphs[key]

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        """arrays: input_ids/attention_mask/token_type_ids [N, S] int64 -> [N, H] fp32."""
        n, s = arrays[0].shape
        if not self.use_graphs:
            t = [torch.from_numpy(a).to(self.device) for a in arrays]
            with torch.inference_mode():
                return self.model(*t).cpu().numpy()
        b, sb = bucket(n, self.batch_buckets), bucket(s, self.seq_buckets)
        for dst, a in zip(self.static_in, arrays):
            dst[:n, :s].copy_(torch.from_numpy(a))
        # Padding is masked out; stale ids/types there are valid indices, so only the mask is reset.
        mask = self.static_in[1]
        if sb > s:
            mask[:n, s:sb].zero_()
        if b > n:
            mask[n:b, :sb].zero_()
            mask[n:b, :1] = 1  # padding rows: one visible token, no NaN from empty rows
        g, out = self._graph(b, sb)
        g.replay()
        return out[:n].cpu().numpy()

    def execute(self, requests):
        responses = [None] * len(requests)
        batch, owners = [], []
        for i, r in enumerate(requests):
            try:
                arrays = [pb_utils.get_input_tensor_by_name(r, name) for name in INPUTS]
                ids = arrays[0].as_numpy()
                mask = arrays[1].as_numpy() if arrays[1] is not None else np.ones_like(ids)
                types = arrays[2].as_numpy() if arrays[2] is not None else np.zeros_like(ids)
                if ids.ndim != 2 or mask.shape != ids.shape or types.shape != ids.shape:
                    raise ValueError(f"input_ids/attention_mask/token_type_ids must share shape [batch, seq], got "
                                     f"{ids.shape}/{mask.shape}/{types.shape}")
                if ids.shape[1] > self.seq_buckets[-1]:
                    raise ValueError(f"sequence length {ids.shape[1]} > max {self.seq_buckets[-1]}")
                if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
                    raise ValueError(f"input_ids must be in [0, {self.vocab})")
                batch.append((ids.astype(np.int64), mask.astype(np.int64), types.astype(np.int64)))
                owners.append(i)
            except ValueError as e:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        if batch:
            s = max(a[0].shape[1] for a in batch)
            padded = [np.concatenate([np.pad(a[k], ((0, 0), (0, s - a[k].shape[1]))) for a in batch]) for k in range(3)]
            emb = self._run(padded)
            start = 0
            for (ids, _, _), i in zip(batch, owners):
                n = ids.shape[0]
                responses[i] = pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT, emb[start:start + n])])
                start += n
        return responses

    def finalize(self):
        self.graphs.clear()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
