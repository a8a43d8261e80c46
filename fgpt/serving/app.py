"""The OpenAI-compatible HTTP layer over the engines: POST /v1/completions, GET /v1/models,
GET /health and GET / (the playground page). Starlette, run by uvicorn (run/serve.py).

Requests are checked here and answered with OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`; the engines only ever see valid jobs.
Text is decoded per choice with an incremental UTF-8 decoder (a character split over two
tokens appears once whole), so the streamed pieces join to the text of the whole sequence.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from importlib import resources

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from fgpt.data.tokenizer import gpt2_encoding
from fgpt.errors import FgptError
from fgpt.inference.generate import Sampling
from fgpt.serving.engine import DoneEvent, Engine, Job, PromptEvent, Row, TokenEvent

MAX_BODY = 4 << 20  # bytes of request body
MAX_LOGPROBS = 20  # OpenAI's limit on `logprobs`
MAX_STOP = 4


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class Model:
    name: str
    engine: Engine
    n_ctx: int
    vocab_size: int
    created: int


@dataclass
class Choice:
    """One choice being answered: its row in the engine, its text so far and its logprobs."""
    index: int
    prompt: list[int]
    row: Row | None = None
    text: str = ""  # completion text, stop strings cut
    sent: int = 0  # characters of `text` already streamed
    tokens: int = 0
    finish: str | None = None
    lp_tokens: list | None = None
    lp_values: list | None = None
    lp_top: list | None = None
    lp_offsets: list | None = None

    def __post_init__(self):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")


def _int(body: dict, key: str, default, lo=None, hi=None, none_ok=True):
    v = body.get(key, default)
    if v is None:
        if none_ok:
            return default
        raise ApiError(f"'{key}' must not be null", key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{key}' must be an integer, got {json.dumps(v)}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(f"'{key}' must be {bounds}, got {v}", key)
    return v


def _float(body: dict, key: str, default):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(f"'{key}' must be a number, got {json.dumps(v)}", key)
    return float(v)


def _object(body: dict, key: str) -> dict:
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise ApiError(f"'{key}' must be an object", key)
    return value


def _bool(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"'{key}' must be a boolean, got {json.dumps(v)}", key)
    return v


class Server:
    def __init__(self, models: list[Model], max_body: int = MAX_BODY):
        self.models = {m.name: m for m in models}
        self.max_body = max_body
        self.enc = gpt2_encoding()

    # --- the routes -------------------------------------------------------------------------

    def app(self) -> Starlette:
        def guarded(fn):
            async def route(request: Request):
                try:
                    return await fn(request)
                except ApiError as e:
                    return e.response()
                except Exception as e:  # a bug, not bad input: still the API's error shape, and serving goes on
                    logging.getLogger("fgpt.serve").exception("internal error")
                    return ApiError(f"internal error ({type(e).__name__})", code="internal_error", status=500,
                                    type="server_error").response()
            return route
        return Starlette(routes=[
            Route("/v1/completions", guarded(self.completions), methods=["POST"]),
            Route("/v1/models", guarded(self.list_models), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/", self.playground, methods=["GET"]),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed},
            lifespan=self.lifespan)

    async def _not_found(self, request, exc):
        return ApiError(f"no route {request.method} {request.url.path}", code="not_found", status=404).response()

    async def _not_allowed(self, request, exc):
        return ApiError(f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed",
                        status=405).response()

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The engines decode while the app serves, and stop with it."""
        for m in self.models.values():
            m.engine.start()
        try:
            yield
        finally:
            for m in self.models.values():
                m.engine.stop()

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "models": {
            name: {"live_rows": m.engine.live_rows, "queued": m.engine.queued, "max_batch": m.engine.max_batch,
                   "rows_left": dict(m.engine.left)}
            for name, m in self.models.items()}})

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "fgpt", "max_model_len": m.n_ctx}
            for m in self.models.values()]})

    async def playground(self, request: Request) -> HTMLResponse:
        return HTMLResponse(resources.files("fgpt.serving").joinpath("playground.html").read_text("utf-8"))

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise ApiError(f"request body of {declared} bytes exceeds {self.max_body}", code="body_too_large",
                           status=413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(f"request body exceeds {self.max_body} bytes", code="body_too_large", status=413)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError("the body must be a JSON object")
        return body

    # --- POST /v1/completions -------------------------------------------------------------

    def _model(self, body: dict) -> Model:
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise ApiError(f"'model' must be a string, got {json.dumps(name)}", "model")
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ApiError(f"the model {json.dumps(name)} does not exist; loaded: {', '.join(self.models)}",
                           "model", "model_not_found", status=404)
        return self.models[name]

    def _prompts(self, body: dict, model: Model) -> list[list[int]]:
        p = body.get("prompt")
        if isinstance(p, str):
            p = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            p = [p]
        if not isinstance(p, list) or not p:
            raise ApiError("'prompt' must be a string, a list of strings, a list of token ids or a list "
                           "of such lists", "prompt")
        out = []
        for item in p:
            if isinstance(item, str):
                ids = self.enc.encode(item, allowed_special={"<|endoftext|>"})
            elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                ids = item
                bad = [t for t in ids if not 0 <= t < min(model.vocab_size, self.enc.n_vocab)]
                if bad:
                    raise ApiError(f"token id {bad[0]} is outside the vocabulary", "prompt")
            else:
                raise ApiError("each prompt must be a string or a list of token ids", "prompt")
            if not ids:
                raise ApiError("empty prompt: give at least one token", "prompt")
            out.append(ids)
        return out

    def _parse(self, body: dict):
        model = self._model(body)
        prompts = self._prompts(body, model)
        max_tokens = _int(body, "max_tokens", 16, lo=0)
        n = _int(body, "n", 1, lo=1, hi=model.engine.max_batch)
        for key in ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "suffix"):
            if body.get(key) not in (None, 0, 0.0, 1.0 if key == "repetition_penalty" else 0, {}, ""):
                raise ApiError(f"'{key}' is not supported by this server", key, "unsupported_parameter")
        best_of = body.get("best_of")
        if best_of not in (None, n):
            raise ApiError("'best_of' other than n is not supported", "best_of")
        top_k = _int(body, "top_k", None)
        if top_k is not None and top_k <= 0:  # vLLM's convention: -1 (or 0) = off
            top_k = None
        temperature, top_p = _float(body, "temperature", 1.0), _float(body, "top_p", 1.0)
        try:
            sampling = Sampling(temperature, top_k, top_p if top_p != 1 else None)
        except FgptError as e:
            param = "temperature" if "temperature" in str(e) else "top_p" if "top_p" in str(e) else "top_k"
            raise ApiError(str(e), param) from None
        seed = _int(body, "seed", None)
        if seed is not None and not 0 <= seed < 2 ** 63 - n:
            raise ApiError(f"'seed' must be in [0, 2**63 - n), got {seed}", "seed")
        logprobs = _int(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS)
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
        for ids in prompts:
            if len(ids) + max_tokens > model.n_ctx:
                raise ApiError(f"the prompt's {len(ids)} tokens + max_tokens {max_tokens} exceed the model's "
                               f"context of {model.n_ctx} tokens", "prompt", "context_length_exceeded")
        return dict(model=model, prompts=prompts, max_tokens=max_tokens, n=n, sampling=sampling, seed=seed,
                    logprobs=logprobs, stop=stop, echo=_bool(body, "echo"), stream=_bool(body, "stream"),
                    ignore_eos=_bool(body, "ignore_eos"),
                    include_usage=bool(_object(body, "stream_options").get("include_usage")))

    async def completions(self, request: Request):
        req = self._parse(await self._body(request))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        choices: list[Choice] = []
        for prompt in req["prompts"]:
            rows = []
            for j in range(req["n"]):
                c = Choice(len(choices), prompt)
                emit = (lambda i: lambda ev: loop.call_soon_threadsafe(events.put_nowait, (i, ev)))(c.index)
                seed = req["seed"] + j if req["seed"] is not None else secrets.randbits(62)
                c.row = Row(req["sampling"], torch.Generator().manual_seed(seed), req["max_tokens"], emit,
                            logprobs=req["logprobs"], stop_at_eos=not req["ignore_eos"])
                if req["logprobs"] is not None:
                    c.lp_tokens, c.lp_values, c.lp_top, c.lp_offsets = [], [], [], []
                choices.append(c)
                rows.append(c.row)
            req["model"].engine.submit(Job(prompt, rows, echo_logprobs=req["logprobs"],
                                           want_echo=req["echo"] and req["logprobs"] is not None))
        meta = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": req["model"].name}
        if req["echo"]:
            for c in choices:
                self._echo_text(c)
        if req["stream"]:
            return StreamingResponse(self._sse(req, choices, events, meta), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while any(c.finish is None for c in choices):
                i, ev = await events.get()
                self._apply(choices[i], ev, req)
        finally:
            for c in choices:
                c.row.cancelled = True  # done, or the handler was cancelled: the rows leave
        return JSONResponse({**meta, "choices": [self._choice_json(c, c.text, final=True) for c in choices],
                             "usage": self._usage(choices)})

    def _usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(p) for p in {id(c.prompt): c.prompt for c in choices}.values())
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _echo_text(self, c: Choice) -> None:
        c.text = c.utf8.decode(self.enc.decode_bytes(c.prompt))
        if c.lp_tokens is not None:
            self._add_logprob_tokens(c, c.prompt)

    def _add_logprob_tokens(self, c: Choice, ids: list[int]) -> None:
        offset = c.lp_offsets[-1] + len(c.lp_tokens[-1]) if c.lp_offsets else 0
        for t in ids:
            s = self.enc.decode([t])
            c.lp_tokens.append(s)
            c.lp_offsets.append(offset)
            offset += len(s)

    def _top(self, top) -> dict | None:
        if top is None:
            return None
        out = {}
        for t, v in top:
            out.setdefault(self.enc.decode([t]), v)  # tokens that decode alike keep the likeliest
        return out

    def _apply(self, c: Choice, ev, req: dict) -> None:
        """Fold one engine event into the choice."""
        if c.finish is not None:
            return
        if isinstance(ev, PromptEvent):
            if c.lp_values is not None:
                c.lp_values[:0] = ev.logprobs  # before any completion token
                c.lp_top[:0] = [self._top(t) if t is not None else None for t in ev.top]
            return
        if isinstance(ev, DoneEvent):
            if ev.reason == "error":
                raise ApiError(f"generation failed: {ev.message}", type="server_error", status=500)
            c.text += c.utf8.decode(b"", final=True)
            c.finish = ev.reason
            return
        c.tokens += 1
        if c.lp_tokens is not None:
            self._add_logprob_tokens(c, [ev.token])
            c.lp_values.append(ev.logprob)
            c.lp_top.append(self._top(ev.top) if req["logprobs"] else None)
        c.text += c.utf8.decode(self.enc.decode_single_token_bytes(ev.token))
        if req["stop"]:
            start = len(self.enc.decode(c.prompt)) if req["echo"] else 0
            hits = [i for i in (c.text.find(s, start) for s in req["stop"]) if i >= 0]
            if hits:
                c.text = c.text[:min(hits)]
                c.finish = "stop"
                c.row.cancelled = True

    def _logprobs_json(self, c: Choice, start: int = 0):
        if c.lp_tokens is None:
            return None
        end = len(c.lp_values)  # prompt logprobs arrive with the first event
        return {"tokens": c.lp_tokens[start:end], "token_logprobs": c.lp_values[start:end],
                "top_logprobs": c.lp_top[start:end], "text_offset": c.lp_offsets[start:end]}

    def _choice_json(self, c: Choice, text: str, final: bool, lp=None) -> dict:
        return {"index": c.index, "text": text, "logprobs": lp if not final else self._logprobs_json(c),
                "finish_reason": c.finish if final else None}

    async def _sse(self, req: dict, choices: list[Choice], events: asyncio.Queue, meta: dict):
        hold = max((len(s) for s in req["stop"]), default=1) - 1  # a stop string may still be forming
        lp_sent = [0] * len(choices)

        def chunk(c: Choice, final: bool) -> str:
            end = len(c.text) if final or c.finish else max(c.sent, len(c.text) - hold)
            text, c.sent = c.text[c.sent:end], end
            lp = None
            if c.lp_tokens is not None:
                lp = self._logprobs_json(c, lp_sent[c.index])
                lp_sent[c.index] = len(c.lp_values)
            body = {**meta, "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                         "finish_reason": c.finish if final else None}]}
            return f"data: {json.dumps(body)}\n\n"

        try:
            while any(c.finish is None for c in choices):
                try:
                    i, ev = await events.get()
                    c = choices[i]
                    was = c.finish
                    self._apply(c, ev, req)
                except ApiError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': None}})}\n\n"
                    break
                if was is None and (isinstance(ev, TokenEvent) or c.finish is not None):
                    yield chunk(c, final=c.finish is not None)
            if req["include_usage"]:
                yield f"data: {json.dumps({**meta, 'choices': [], 'usage': self._usage(choices)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: its rows leave the batch
            for c in choices:
                c.row.cancelled = True


def make_app(models: list[Model], **kwargs) -> Starlette:
    return Server(models, **kwargs).app()


def model_name(path: str) -> str:
    """A checkpoint's id: its directory's name (a .safetensors file: the folder it is in)."""
    p = os.path.abspath(path)
    if os.path.isfile(p):
        p = os.path.dirname(p)
    return os.path.basename(p.rstrip(os.sep)) or p
