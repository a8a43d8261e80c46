"""Continuous batching: one decode loop per model over one batched KV cache.

A request (a `Job`: one prompt, `n` rows) waits in a queue until the batch has room for its
rows; between two decode steps the loop prefills the prompts that fit (those of one length as
one batch), samples each row's first token and writes the prompt's keys and values into free
rows of the shared cache (`KVCache.put_row`:
every row keeps its own left padding, so positions start at 0 in each). Then every live row
advances one token per step, each with its own sampling settings and generator
(`fgpt.inference.generate.sample_rows`), and leaves when it is done or cancelled (a client that went
away, a stop string met). Live rows stay packed at the front of the cache, so a step costs
what its live rows need: the weights are read once for all of them, where float weights are
stored for products over several rows (`fgpt.inference.batched`, measured per machine).

The cache's slots are shared by all rows; a prompt longer than the cursor shifts the others
right to make room, and when the cursor reaches the end the slots before every live row's
start are dropped (`KVCache.shift`). Row i's tokens equal `fgpt.inference.generate.stream` for its
prompt and seed alone, up to float rounding of a different batch (the same code samples).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from fgpt.config import GPTConfig
from fgpt.data.tokenizer import EOT
from fgpt.inference.batched import batched_layout
from fgpt.inference.generate import Sampling, sample_rows
from fgpt.inference.kv_cache import KVCache
from fgpt.model import head, trunk

log = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    token: int
    logprob: float | None = None  # log-probability under the model (temperature 1), if asked
    top: list[tuple[int, float]] | None = None  # the `logprobs` likeliest (id, logprob)


@dataclass
class PromptEvent:
    """Echo: each prompt token's logprob (None for the first) and the likeliest alternatives."""
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class DoneEvent:
    reason: str  # "stop" (end of text) | "length" (max_tokens) | "error"
    message: str = ""


@dataclass
class Row:
    """One sequence being decoded: a choice of one request."""
    sampling: Sampling
    generator: torch.Generator | None
    max_tokens: int
    emit: Callable[[object], None]  # called from the engine's thread
    logprobs: int | None = None  # top-k per token; None = none
    stop_at_eos: bool = True
    cancelled: bool = False  # set by the caller (client gone, stop string): the row leaves
    n_out: int = 0
    next_token: int = -1


@dataclass
class Job:
    prompt: list[int]
    rows: list[Row]
    echo_logprobs: int | None = None  # echo: prompt logprobs with this many alternatives (0 = none)
    want_echo: bool = False


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """logits [B, V], tokens [B] -> (logprob [B], top-k (ids, logprobs) [B, k]) in fp32."""
    lp = logits.float().log_softmax(dim=-1)
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)
    top = lp.topk(k, dim=-1) if k > 0 else None
    return chosen, top


@dataclass
class Engine:
    params: dict
    config: GPTConfig
    max_batch: int = 8
    batched_weights: bool = True  # float weights for products over several rows (fgpt.inference.batched)
    vocab_limit: int | None = None  # sample only ids below it (a padded vocabulary)
    eos_id: int = EOT
    _queue: queue.Queue = field(default_factory=queue.Queue)
    _stop: threading.Event = field(default_factory=threading.Event)
    _rows: list[Row] = field(default_factory=list)
    _waiting: list[Job] = field(default_factory=list)
    _thread: threading.Thread | None = None
    left: dict = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0})  # rows, by why they left

    def __post_init__(self):
        if self.batched_weights:
            self.params = batched_layout(self.params, self.max_batch)
        ln_f = self.params["ln_f"]["weight"]
        self.dtype, self.device = ln_f.dtype, ln_f.device
        self.cache = KVCache.allocate(self.config, self.max_batch, self.config.n_ctx, dtype=self.dtype,
                                      device=self.device)

    # --- the caller's side (any thread) ---------------------------------------------------

    def submit(self, job: Job) -> None:
        if len(job.rows) > self.max_batch:
            raise ValueError(f"{len(job.rows)} rows > max_batch {self.max_batch}")
        self._queue.put(job)

    @property
    def live_rows(self) -> int:
        """Rows in the batch now (a load test reads it: 0 once every request is answered)."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def start(self) -> "Engine":
        if self._thread is not None:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fgpt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # --- the loop (its own thread) --------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._admit(block=not self._rows)
                    self._drop_cancelled()
                    if self._rows:
                        self._decode_step()
                except Exception as e:  # a bug must not kill the loop: end what was live
                    log.exception("engine step failed")
                    for row in self._rows:
                        row.emit(DoneEvent("error", f"{type(e).__name__}: {e}"))
                    self._rows.clear()
            while not self._queue.empty():  # nothing more is admitted: answer what waits
                self._waiting.append(self._queue.get_nowait())
            for row in self._rows + [r for job in self._waiting for r in job.rows]:
                row.emit(DoneEvent("error", "server shutting down"))
            self._rows.clear()
            self._waiting.clear()

    def _admit(self, block: bool) -> None:
        try:
            while True:  # everything submitted so far, in order
                self._waiting.append(self._queue.get(timeout=0.05) if block and not self._waiting
                                     else self._queue.get_nowait())
                block = False
        except queue.Empty:
            pass
        admitted, rows = [], len(self._rows)
        while self._waiting and rows + len(self._waiting[0].rows) <= self.max_batch:
            job = self._waiting.pop(0)
            if any(not r.cancelled for r in job.rows):
                admitted.append(job)
                rows += len(job.rows)
        by_length: dict[int, list[Job]] = {}
        for job in admitted:  # prompts of one length prefill as one batch, without padding
            by_length.setdefault(len(job.prompt), []).append(job)
        for jobs in by_length.values():
            try:
                self._prefill(jobs)
            except Exception as e:  # these rows never joined: end them here, the batch goes on
                log.exception("prefill failed")
                joined = set(map(id, self._rows))
                for row in (r for job in jobs for r in job.rows if id(r) not in joined):
                    row.emit(DoneEvent("error", f"{type(e).__name__}: {e}"))

    def _prefill(self, jobs: list[Job]) -> None:
        """Prompts of one length P: one forward pass [len(jobs), P], then each job's rows
        sample their first tokens and join the batch."""
        P = len(jobs[0].prompt)
        tokens = torch.tensor([job.prompt for job in jobs], device=self.device)  # [J, P]
        fresh = KVCache.allocate(self.config, len(jobs), P, dtype=self.dtype, device=self.device)
        x = trunk(self.params, tokens, self.config, cache=fresh)  # [J, P, d]
        last = head(self.params, x[:, -1:], self.config)[:, -1, :self.vocab_limit]  # [J, V], as `stream`
        for g, job in enumerate(jobs):
            if job.want_echo:
                self._echo(head(self.params, x[g:g + 1], self.config)[0, :, :self.vocab_limit], job)
            rows = [r for r in job.rows if not r.cancelled]
            for r in rows:
                if r.max_tokens == 0:
                    r.emit(DoneEvent("length"))
            live = [r for r in rows if r.max_tokens > 0]
            if not live:
                continue
            first = sample_rows(last[g:g + 1].expand(len(live), -1), [r.sampling for r in live],
                                [r.generator for r in live])
            joined = [r for r, t in zip(live, first.tolist()) if self._emit(r, t, last[g])]
            if joined and self.cache.length < P:  # room in front of the cursor for the whole prompt
                self.cache.shift(P - self.cache.length) if self._rows else self._reset(P)
            for r in joined:
                self.cache.put_row(len(self._rows), fresh, g)
                self._rows.append(r)

    def _reset(self, length: int) -> None:
        self.cache.length = 0
        self.cache.shift(length)

    def _echo(self, logits: torch.Tensor, job: Job) -> None:
        """Each prompt token's logprob given the ones before it (the first has none)."""
        targets = torch.tensor(job.prompt[1:], device=logits.device)
        k = job.echo_logprobs or 0
        lp, top = token_logprobs(logits[:-1], targets, k)
        tops = [None] + ([list(zip(i.tolist(), v.tolist())) for v, i in zip(*top)] if top is not None
                         else [None] * len(targets))
        event = PromptEvent([None] + lp.tolist(), tops)
        for r in job.rows:
            r.emit(event)

    def _emit(self, row: Row, token: int, logits: torch.Tensor) -> bool:
        """Hand the row's new token to its caller; False once the row is done."""
        row.n_out += 1
        if row.stop_at_eos and token == self.eos_id:
            row.emit(DoneEvent("stop"))
            self.left["stop"] += 1
            return False
        event = TokenEvent(token)
        if row.logprobs is not None:
            lp, top = token_logprobs(logits[None], torch.tensor([token], device=logits.device), row.logprobs)
            event.logprob = float(lp[0])
            if top is not None:
                event.top = list(zip(top.indices[0].tolist(), top.values[0].tolist()))
        row.emit(event)
        if row.n_out >= row.max_tokens:
            row.emit(DoneEvent("length"))
            self.left["length"] += 1
            return False
        row.next_token = token
        return True

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self._rows) if r.cancelled]
        self.left["cancelled"] += len(gone)
        self._remove(gone)

    def _remove(self, gone: list[int]) -> None:
        """Leave the batch, keeping the live rows packed at the front: the last row moves
        into each hole."""
        for i in sorted(gone, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self.cache.move_row(last, i)
                self._rows[i] = self._rows[last]
            self._rows.pop()

    def _decode_step(self) -> None:
        n = len(self._rows)
        if self.cache.length + 1 > self.cache.capacity:  # drop the slots before every live row
            self.cache.shift(-int(self.cache.pad[:n].min()))
        view = self.cache.first_rows(n)
        tokens = torch.tensor([[r.next_token] for r in self._rows], device=self.device)  # [n, 1]
        logits = head(self.params, trunk(self.params, tokens, self.config, cache=view), self.config)
        self.cache.length = view.length
        logits = logits[:, -1, :self.vocab_limit]  # [n, V]
        new = sample_rows(logits, [r.sampling for r in self._rows], [r.generator for r in self._rows])
        done = [i for i, (r, t) in enumerate(zip(self._rows, new.tolist())) if not self._emit(r, t, logits[i])]
        self._remove(done)
