"""One process, one device: torch.func.grad_and_value of the pure loss, AdamW on the leaves."""

from __future__ import annotations

import torch
from torch.func import grad_and_value

from fgpt import tree
from fgpt.config import GPTConfig
from fgpt.model import loss_fn
from fgpt.parallel.base import Strategy


def adamw_param_groups(named: dict[str, torch.Tensor], weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings (>= 2-D), not biases or layer-norm gains (1-D)."""
    decay = [p for p in named.values() if p.ndim >= 2]
    no_decay = [p for p in named.values() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class SingleDevice(Strategy):
    name = "single"

    def __init__(self, device: str | torch.device = "cpu", **_):
        self.device = torch.device(device)

    def setup(self, params, config: GPTConfig, *, lr, weight_decay, betas, precision):
        self.config = config
        self.compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.params = tree.tree_map(lambda x: x.detach().to(self.device, torch.float32).clone(), params)
        self.named = tree.flatten(self.params)  # same tensors, dotted names
        self.optimizer = torch.optim.AdamW(adamw_param_groups(self.named, weight_decay),
                                           lr=lr, betas=betas, fused=self.device.type == "cuda")

    def _loss(self, params, tokens, targets):
        if self.compute_dtype != torch.float32:
            params = tree.cast(params, self.compute_dtype)
        return loss_fn(params, tokens, targets, self.config, train=True)

    def forward_backward(self, tokens, targets, *, scale, sync):
        grads, loss = grad_and_value(self._loss)(self.params, tokens.to(self.device), targets.to(self.device))
        for name, g in tree.flatten(grads).items():
            p = self.named[name]
            if p.grad is None:
                p.grad = g.mul_(scale)
            else:
                p.grad.add_(g, alpha=scale)
        return loss.detach()

    def clip_grad_norm(self, max_norm):
        grads = [p.grad for p in self.named.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if max_norm > 0:
            torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        return float(norm)

    def set_lr(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def full_params(self):
        return tree.tree_map(lambda x: x.detach().to("cpu", copy=True), self.params)

    def optimizer_state(self):
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state):
        self.optimizer.load_state_dict(state)

    def load_params(self, params):
        with torch.no_grad():
            for name, value in tree.flatten(params).items():
                self.named[name].copy_(value)
