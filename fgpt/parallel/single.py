"""One process, one device: torch.func's gradient of the pure loss, AdamW on the leaves."""

from __future__ import annotations

import sys

import torch
from torch.func import vjp

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.errors import FgptError, compiler_failure
from fgpt.model import loss_fn
from fgpt.parallel.base import Strategy, adamw_param_groups
from fgpt.parallel.optimizer_state import SavedOptimizer, load_per_parameter, save_per_parameter, whole
from fgpt.attention import check_window_kernel
from fgpt.recompute import check as recompute_mode
from fgpt.tree import COMPUTE_DTYPES


def grads_and_value(fn):
    """fn(params, *args) -> scalar  ==>  (d fn / d params, fn(params, *args)), functionally.

    torch.func.grad_and_value runs its backward with create_graph=True (so that grad can
    nest), which makes the autograd engine record a graph of the backward and sum
    gradients out of place, a cost torch.autograd.grad does not pay (docs/performance.md,
    "The torch.func overhead"). torch.func.vjp leaves that to its caller: its pullback, run
    in no-grad mode, differentiates the same pure function without either."""
    def run(params, *args):
        value, pullback = vjp(lambda p: fn(p, *args), params)
        with torch.no_grad():
            (grads,) = pullback(torch.ones_like(value), retain_graph=False)
        return grads, value
    return run


class SingleDevice(Strategy):
    name = "single"

    def __init__(self, device: str | torch.device = "cpu", compile: bool = False,
                 reduce_dtype: str = "fp32", recompute: str = "none", window_kernel: str = "band", **_):
        if reduce_dtype != "fp32":
            raise FgptError(f"--reduce-dtype {reduce_dtype}: strategy=single reduces no gradients "
                            "across ranks; use it with ddp, fsdp or custom-fsdp")
        self.device = torch.device(device)
        self.compile = compile
        self.recompute = recompute_mode(recompute)
        self.window_kernel = check_window_kernel(window_kernel)

    def setup(self, params, config: GPTConfig, *, lr, weight_decay, betas, precision):
        self.config = config
        self.compute_dtype = COMPUTE_DTYPES[precision]
        self.params = tree.tree_map(lambda x: x.detach().to(self.device, torch.float32).clone(), params)
        self.named = tree.flatten(self.params)  # same tensors, dotted names
        # fused: one kernel over all leaves instead of the default per-tensor loop (`just bench
        # train` shows the gap: "transformers fp32" against "transformers fp32 fused AdamW").
        self.optimizer = torch.optim.AdamW(adamw_param_groups(self.named, weight_decay),
                                           lr=lr, betas=betas, fused=True)
        self._eager = grads_and_value(self._loss)
        self._compiled = None  # made at the first compiled step: `compile` may change before it
        self._compute_tree = None

    def _grads_and_loss(self, *args):
        """The compiled step where `compile` is set, else the eager one. A compile that fails
        (no C++ compiler, a Python torch.compile refuses, an inductor error) says so in one
        line and the run continues eagerly; nothing was accumulated yet, so the step reruns."""
        if self.compile:
            first = self._compiled is None
            try:
                if first:
                    self._compiled = torch.compile(self._eager)
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure; eager code is the fallback
                if not first:  # it compiled and ran before: this is the step's own error, not the compiler's
                    raise
                print(compiler_failure(e), file=sys.stderr)
                self.compile, self._compiled = False, None
        return self._eager(*args)

    def _compute_params(self) -> dict:
        """fp32: the master tree itself. bf16: one cast copy per optimizer step, shared by
        all micro-steps, rather than a cast inside every differentiated forward."""
        if self._compute_tree is None:
            self._compute_tree = (self.params if self.compute_dtype == torch.float32
                                  else tree.cast(self.params, self.compute_dtype))
        return self._compute_tree

    def _loss(self, params, tokens, targets):
        return loss_fn(params, tokens, targets, self.config, train=True, recompute=self.recompute,
                       window_kernel=self.window_kernel)

    def forward_backward(self, tokens, targets, *, scale, sync):
        grads, loss = self._grads_and_loss(self._compute_params(), tokens.to(self.device),
                                          targets.to(self.device))
        for name, g in tree.flatten(grads).items():  # accumulate in fp32 on the master leaves
            p = self.named[name]
            if p.grad is None:
                p.grad = g.to(torch.float32) if scale == 1.0 else g.to(torch.float32).mul_(scale)
            else:
                p.grad.add_(g, alpha=scale)
        return loss.detach()

    def eval_loss(self, tokens, targets):
        with torch.no_grad():
            return loss_fn(self._compute_params(), tokens.to(self.device), targets.to(self.device), self.config,
                           window_kernel=self.window_kernel)

    def clip_grad_norm(self, max_norm):
        grads = [p.grad for p in self.named.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_norm > 0:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return float(norm)

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._compute_tree = None  # the bf16 copy is stale now

    def full_params(self):
        return tree.tree_map(lambda x: x.detach().to("cpu", copy=True), self.params)

    def optimizer_state(self):
        return save_per_parameter(self.optimizer, self.named, whole)

    def load_optimizer_state(self, saved: SavedOptimizer):
        load_per_parameter(self.optimizer, self.named, saved, 0, whole, lambda p, v: v.to(p.device))
