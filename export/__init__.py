"""Export Hugging Face models into the Triton model repository (ONNX, TensorRT, Python-backend LLMs)."""
