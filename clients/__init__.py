"""Clients of the served models: gRPC and HTTP (tritonclient), importable functions with thin CLIs."""
