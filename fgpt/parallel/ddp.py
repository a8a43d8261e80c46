"""ddp: every rank holds the whole model; DistributedDataParallel all-reduces (mean) the
gradients in buckets while backward runs. Micro-steps with sync=False skip that (no_sync)."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from fgpt.parallel.adapter import AdapterStrategy, GPTModule


class DDP(AdapterStrategy):
    name = "ddp"

    def wrap(self, params, config, precision):
        compute_dtype = torch.bfloat16 if precision == "bf16" else None
        module = GPTModule(params, config, compute_dtype)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, device_mesh=self.mesh)

    def no_sync(self):
        return self.model.no_sync()
