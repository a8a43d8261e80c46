"""The LM head's cross-entropy, a chunk of rows at a time: mean over targets of
logsumexp(x @ W.T) - (x @ W.T)[target], without the [tokens, V] logits.

`F.cross_entropy(x @ W.T)` keeps a [tokens, V] fp32 tensor for its backward and makes
several more on the way (logits, log-probabilities, their gradients): over GPT-2's 50257
ids that is 206 MB per 1024 tokens each, the largest activations of a step. Here each
chunk's logits become its softmax in place, and the gradients of x and W are finished in
the forward, so the backward only scales them; what stays alive is W's gradient (the size
of W, whatever the number of tokens) and x's. A batch that fits one chunk goes to
F.cross_entropy itself, which is the faster there (on a CPU).

The products run in x's dtype (bf16 under bf16 training, as `x @ W.T` would) and the
softmax in fp32 (of a bf16 chunk, a slice of rows at a time, written back as bf16: the
fp32 copy is a slice's, not the chunk's); W's gradient is summed over chunks in fp32.
"""

from __future__ import annotations

import torch

IGNORE = -1  # targets of -1 are left out of the loss (and of the count it is the mean over)
# one chunk: the rows whose fp32 logits take 256 MiB, 1335 of GPT-2's vocabulary. Smaller chunks make
# thinner matmuls, which a CPU runs slower (the probe that chose this size: docs/performance.md)
CHUNK_BYTES = 2 ** 28
SOFTMAX_BYTES = 2 ** 25  # the fp32 softmax of a bf16 chunk, a slice at a time (`softmax_rows`)


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """x [N, d], weight [V, d], targets [N] (-1: ignored) -> the mean cross-entropy of the
    logits x @ weight.T (fp32 scalar), `rows` rows at a time where N needs more than one
    chunk. Differentiable in x and weight (once: the gradient is computed in the forward)."""
    rows = rows or chunk_rows(weight.shape[0])
    if x.shape[0] <= rows:  # one chunk: F.cross_entropy's own kernels are the faster (on a CPU)
        return reference_cross_entropy(x, weight, targets)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, rows)[0]
    return _loss_and_grads(x, weight, targets, rows, grads=False)[0]


def _loss_and_grads(x, weight, targets, rows, grads: bool):
    count = (targets != IGNORE).sum()  # 0 gives nan, as F.cross_entropy does
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grads else None
    for start in range(0, x.shape[0], rows):
        xc, tc = x[start:start + rows], targets[start:start + rows]
        logits = xc @ weight.T  # [r, V] in x's dtype; becomes d loss / d logits in place
        step = softmax_rows(logits)
        for part in range(0, logits.shape[0], step):
            total += _softmax_part(logits[part:part + step], tc[part:part + step], count, grads)
        if not grads:
            continue
        grad_x[start:start + rows] = logits @ weight
        if logits.dtype == torch.float32:
            grad_w.addmm_(logits.T, xc)
        else:  # bf16 products, summed in fp32
            grad_w += logits.T @ xc
    return total / count, grad_x, None if grad_w is None else grad_w.to(weight.dtype)


def softmax_rows(logits: torch.Tensor) -> int:
    """Rows of a chunk's logits whose softmax runs at once: all of them in fp32, where it
    runs in place; else as many as SOFTMAX_BYTES of fp32 hold, so that the fp32 copy of a
    bf16 chunk is a slice's, not the chunk's (256 MiB less at the peak of a bf16 step)."""
    return logits.shape[0] if logits.dtype == torch.float32 else max(1, SOFTMAX_BYTES // (4 * logits.shape[1]))


def _softmax_part(logits: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, grads: bool) -> torch.Tensor:
    """The summed loss of some rows of logits [r, V] (fp32 softmax); with `grads`, the rows
    become d loss / d logits = (softmax - one_hot(target)) / count, zero on ignored rows."""
    f = logits.float()  # the same tensor where logits are fp32
    valid = targets != IGNORE
    picked = targets.clamp(min=0)[:, None]
    lse = torch.logsumexp(f, dim=1)
    loss = (lse - f.gather(1, picked)[:, 0]).masked_fill_(~valid, 0).sum()
    if grads:
        weights = valid.to(torch.float32)[:, None]
        f.sub_(lse[:, None]).exp_().scatter_add_(1, picked, -weights).mul_(weights / count)
        if f is not logits:  # a bf16 slice: back into the chunk
            logits.copy_(f)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """(loss, d loss/dx, d loss/dW) from one forward; the backward scales the last two."""

    @staticmethod
    def forward(x, weight, targets, rows):
        return _loss_and_grads(x, weight, targets, rows, grads=True)

    @staticmethod
    def setup_context(ctx, inputs, output):  # the torch.func-compatible form
        _, grad_x, grad_w = output
        ctx.save_for_backward(grad_x, grad_w)
        ctx.mark_non_differentiable(grad_x, grad_w)

    @staticmethod
    def backward(ctx, grad_loss, _grad_x, _grad_w):
        grad_x, grad_w = ctx.saved_tensors
        # in place: a copy of W's gradient would double the memory this module saves
        return grad_x.mul_(grad_loss.to(grad_x.dtype)), grad_w.mul_(grad_loss.to(grad_w.dtype)), None, None


def reference_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss the direct way, through the full [N, V] logits: the tests' and the
    benchmark's reference."""
    return torch.nn.functional.cross_entropy((x @ weight.T).float(), targets, ignore_index=IGNORE)
