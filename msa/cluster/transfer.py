"""Host-to-device copies that never make the host wait for the device.

A plain ``tensor.to("cuda")`` from pageable memory synchronizes the stream, so a copy issued after
a forward was queued would wait for the whole forward. These copies go through pinned memory from
torch's caching host allocator (a block is reused only after its copy has completed) with
``non_blocking=True``.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """``values`` (any shape) as a tensor on ``device``; on the CPU it shares their memory."""
    host = torch.from_numpy(np.ascontiguousarray(values))
    if device.type == "cpu":
        return host
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)
