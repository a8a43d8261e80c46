"""ddp: every rank holds the whole model; DistributedDataParallel all-reduces (mean) the
gradients in buckets while backward runs. Micro-steps with sync=False skip that (no_sync).
--reduce-dtype bf16 registers torch's bf16 compression hook (NCCL only, see below)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.nn.parallel import DistributedDataParallel

from fgpt.errors import FgptError
from fgpt.parallel.module_wrapper import GPTModule, WrappedModuleStrategy
from fgpt.tree import COMPUTE_DTYPES


def check_bf16_reduction(backend: str) -> None:
    """DDP.register_comm_hook refuses bf16_compress_hook unless CUDA + NCCL >= 2.10 (torch
    2.13 checks the hook's name), although gloo all-reduces bf16 fine: one line instead."""
    if backend != "nccl":
        raise FgptError("ddp: --reduce-dtype bf16 uses torch's bf16_compress_hook, which DDP "
                        f"allows only on CUDA with NCCL (this run uses {backend}); "
                        "use fsdp or custom-fsdp for a bf16 reduction here")


class DDP(WrappedModuleStrategy):
    name = "ddp"

    def wrap(self, params, precision):
        bf16_reduce = self.reduce_dtype == torch.bfloat16
        if bf16_reduce:
            check_bf16_reduction(dist.get_backend())
        compute_dtype = None if precision == "fp32" else COMPUTE_DTYPES[precision]  # autocast for bf16
        module = GPTModule(params, self.config, compute_dtype, self.recompute, self.window_kernel)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids=device_ids, device_mesh=self.mesh)
        if bf16_reduce:  # divide by N, cast to bf16, all-reduce, cast back into the fp32 bucket
            model.register_comm_hook(None, bf16_compress_hook)
        return model

    def no_sync(self):
        return self.model.no_sync()
