"""Launch, check and benchmark the project's Triton Inference Server."""
