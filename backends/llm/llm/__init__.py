"""Streaming LLM engine: continuous batching over a slot-based KV cache (see docs/llm.md)."""
