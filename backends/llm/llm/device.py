"""Host -> device copies that never make the host wait for the device.

A copy from ordinary (pageable) host memory, or any non-blocking=False copy, synchronises with the
stream, i.e. waits for every kernel queued before it. With decode steps overlapping host work
(engine `overlap`), that would make the host wait for the step it just launched. Small index and
parameter tensors therefore go through pinned memory with non_blocking=True; PyTorch's caching
host allocator keeps the pinned buffer alive until the copy has run.
"""
from __future__ import annotations

import torch


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A list (or CPU tensor) as a tensor on `device`, asynchronously when device is CUDA."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def resolve(device: str | torch.device) -> torch.device:
    """'cuda' -> 'cuda:<current>' (set_device, events and streams need an index)."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d
