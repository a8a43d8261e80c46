"""fsdp: torch FSDP2. `fully_shard` each block, then the root (wte / wpe / ln_f: the
embedding and the tied head in one unit), on the explicit 1-D mesh. Parameters, gradients
and AdamW state are DTensors sharded on dim 0; each unit is all-gathered before its forward
and again before its backward, and its gradients are reduce-scattered (mean) after it."""

from __future__ import annotations

import contextlib

from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fgpt.parallel.module_wrapper import GPTModule, WrappedModuleStrategy
from fgpt.tree import COMPUTE_DTYPES


class FSDP2(WrappedModuleStrategy):
    name = "fsdp"

    def wrap(self, params, precision):
        module = GPTModule(params, self.config, recompute=self.recompute, window_kernel=self.window_kernel)
        policy = MixedPrecisionPolicy(param_dtype=None if precision == "fp32" else COMPUTE_DTYPES[precision],
                                      reduce_dtype=self.reduce_dtype)  # --reduce-dtype
        for blk in module.h:
            fully_shard(blk, mesh=self.mesh, mp_policy=policy)
        return fully_shard(module, mesh=self.mesh, mp_policy=policy)

    @contextlib.contextmanager
    def no_sync(self):
        """Keep unsharded gradients; the next synced backward reduce-scatters them all."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
