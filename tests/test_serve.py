"""The completion server (fgpt/serving, run/serve.py) against independent references:
fgpt.inference.generate / run.generate for the same seed, a full forward pass for logprobs, the same
request served alone for batched rows, run.eval --task mc for lm-eval's accuracy; driven by
real clients (the `openai` package, lm-evaluation-harness, a headless chromium).

One server (two tiny checkpoints, max batch 4) runs in a thread on a free loopback port for
the whole module; every wait below is bounded in count and time."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fgpt import GPTConfig, forward, load_checkpoint, save_checkpoint, tree
from fgpt.data.tokenizer import EOT, gpt2_encoding
from fgpt.inference.generate import Sampling, decode_layout, generate
from helpers import wide_params

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

ROOT = Path(__file__).resolve().parents[1]
N_VOCAB = EOT + 1
MAX_BATCH = 4
CONFIGS = {  # two variants, so a batch's bookkeeping meets rotary positions, GQA and rolling caches
    "learned": GPTConfig(vocab_size=N_VOCAB, n_ctx=64, n_layer=2, n_head=2, n_embd=32),
    "rope-gqa-window": GPTConfig(vocab_size=N_VOCAB, n_ctx=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                                 pos_emb="rope", window=12),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    paths = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        paths[name] = root / name
        save_checkpoint(paths[name], config, wide_params(config, seed=i, scale=0.5))
    return paths


@pytest.fixture(scope="module")
def references(checkpoints):
    """What the server loads, loaded again here: (config, params) per model id."""
    return {name: (lambda c, p: (c, decode_layout(p)))(*load_checkpoint(path)) for name, path in checkpoints.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoints):
    """(base url, the app's Server) of a server in a thread, loaded through run.serve's own code."""
    from fgpt.serving.app import Server
    from run import serve
    args = serve.parse_args([a for p in checkpoints.values() for a in ("--checkpoint", str(p))]
                            + ["--max-batch", str(MAX_BATCH), "--max-body", str(1 << 20)])
    state = Server(serve.load_models(args), max_body=args.max_body)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(state.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", state
    srv.should_exit = True
    thread.join(15)


def post(url: str, body, *, raw: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("POST", "/v1/completions", raw if raw is not None else json.dumps(body),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def get(url: str, path: str) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def wait_idle(state, seconds: float = 20) -> None:
    """Until no model holds a batch row or a queued request (bounded)."""
    deadline = time.monotonic() + seconds
    while any(m.engine.live_rows or m.engine.queued for m in state.models.values()):
        assert time.monotonic() < deadline, {n: (m.engine.live_rows, m.engine.queued) for n, m in state.models.items()}
        time.sleep(0.02)


def reference_text(references, model: str, prompt: list[int], n_new: int, sampling: Sampling, seed: int) -> str:
    config, params = references[model]
    row = generate(params, config, [prompt], n_new, sampling=sampling, seed=seed, vocab_limit=N_VOCAB)[0]
    return gpt2_encoding().decode(row[len(prompt):])


# --- the same tokens as fgpt.inference.generate / run.generate --------------------------------------------

SETTINGS = [Sampling(temperature=0), Sampling(temperature=0.9, top_k=200, top_p=0.9), Sampling(temperature=1.3)]


def body_for(model, prompt, n_new, sampling: Sampling, seed, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": n_new, "temperature": sampling.temperature,
            "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": seed, **extra}


def test_same_text_as_run_generate_cli(server, checkpoints, capsys):
    """The server's echo text is what `python -m run.generate` prints for the same seed (its
    main, in this process: the subprocess would only add an import of torch)."""
    from run import generate as run_generate
    url, _ = server
    prompt, seed = "Once upon a time", 7
    capsys.readouterr()
    run_generate.main(["--checkpoint", str(checkpoints["learned"]), "--prompt", prompt, "--max-new-tokens", "20",
                       "--temperature", "0.9", "--top-k", "200", "--top-p", "0.9", "--seed", str(seed)])
    printed = capsys.readouterr().out
    status, out = post(url, body_for("learned", prompt, 20, SETTINGS[1], seed, echo=True))
    assert status == 200, out
    assert out["choices"][0]["text"] == printed.removesuffix("\n")


def test_batched_rows_equal_each_served_alone(server, references):
    """Requests of different models, lengths, settings, n and max_tokens, sent at once (more
    rows than a batch holds, so some join a running batch): each choice's text equals
    fgpt.inference.generate for its prompt alone, choice j with seed + j (run.generate --stream's rule)."""
    url, state = server
    enc = gpt2_encoding()
    cases = []
    for i in range(10):
        model = list(CONFIGS)[i % 2]
        prompt = enc.encode(" ".join(["the cat sat on a mat"] * (1 + i % 4))[: 5 + 9 * i])
        n = 1 + (i % 3 == 0)
        cases.append((model, prompt, 4 + (7 * i) % 30, SETTINGS[i % 3], 100 + i, n))
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda c: post(url, body_for(c[0], c[1], c[2], c[3], c[4], n=c[5],
                                                             ignore_eos=True)), cases))
    for (model, prompt, n_new, sampling, seed, n), (status, out) in zip(cases, answers):
        assert status == 200, out
        assert [c["index"] for c in out["choices"]] == list(range(n))
        for j, choice in enumerate(out["choices"]):
            config, params = references[model]
            row = generate(params, config, [prompt], n_new, sampling=sampling, seed=seed + j, vocab_limit=N_VOCAB,
                           ignore_eos=True)[0]
            assert choice["text"] == enc.decode(row[len(prompt):]), (model, sampling, j)
            assert choice["finish_reason"] == "length"
        assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": n * n_new,
                                "total_tokens": len(prompt) + n * n_new}
    wait_idle(state)


def test_token_ids_and_lists_of_prompts(server, references):
    url, _ = server
    enc = gpt2_encoding()
    prompts = ["Hello there", "A longer prompt about the sea and the sky"]
    as_ids = [enc.encode(p) for p in prompts]
    _, by_text = post(url, body_for("rope-gqa-window", prompts, 12, SETTINGS[0], 0))
    _, by_ids = post(url, body_for("rope-gqa-window", as_ids, 12, SETTINGS[0], 0))
    _, one_id_list = post(url, body_for("rope-gqa-window", as_ids[1], 12, SETTINGS[0], 0))
    texts = [c["text"] for c in by_text["choices"]]
    assert texts == [c["text"] for c in by_ids["choices"]]
    assert texts[1] == one_id_list["choices"][0]["text"]
    assert texts == [reference_text(references, "rope-gqa-window", p, 12, SETTINGS[0], 0) for p in as_ids]


def test_echo_logprobs_equal_a_full_forward_pass(server, references):
    """echo + max_tokens 0 (loglikelihood scoring) and the generated tokens' logprobs: each
    equals log_softmax of one forward pass over the whole sequence, top-k included."""
    url, _ = server
    enc = gpt2_encoding()
    ids = enc.encode("The quick brown fox jumps over the lazy dog")
    for model in CONFIGS:
        config, params = references[model]
        status, out = post(url, {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3})
        assert status == 200, out
        lp = out["choices"][0]["logprobs"]
        assert out["choices"][0]["text"] == enc.decode(ids) and lp["tokens"] == [enc.decode([t]) for t in ids]
        full = forward(params, torch.tensor([ids]), config)[0, :, :N_VOCAB].float().log_softmax(-1)  # [T, V]
        want = full[torch.arange(len(ids) - 1), ids[1:]]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        # fp32, a different batch split (prefill vs one pass): a relative tolerance, not bitwise
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), want, rtol=1e-4, atol=1e-4)
        for t, top in enumerate(lp["top_logprobs"][1:]):
            ref = full[t].topk(3)
            assert sorted(top.values(), reverse=True) == pytest.approx(ref.values.tolist(), rel=1e-4, abs=1e-4)

        status, out = post(url, body_for(model, ids, 6, SETTINGS[0], 0, logprobs=2, ignore_eos=True))
        lp = out["choices"][0]["logprobs"]
        new = enc.encode(out["choices"][0]["text"])
        seq = torch.tensor([ids + new])
        full = forward(params, seq, config)[0, :, :N_VOCAB].float().log_softmax(-1)
        want = full[torch.arange(len(ids) - 1, seq.shape[1] - 1), seq[0, len(ids):]]
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), want, rtol=1e-4, atol=1e-4)
        assert all(len(t) <= 2 for t in lp["top_logprobs"]) and len(lp["tokens"]) == 6


def test_stream_pieces_join_to_the_plain_text_and_stop_strings(server, references):
    url, state = server
    enc = gpt2_encoding()
    prompt = enc.encode("It was a dark and stormy night")
    plain = reference_text(references, "learned", prompt, 24, SETTINGS[0], 0)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body_for("learned", prompt, 24, SETTINGS[0], 0, stream=True,
                                                                ignore_eos=True)))
    lines = [ln for ln in conn.getresponse().read().decode().split("\n\n") if ln]
    conn.close()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    stop = plain[len(plain) // 3: len(plain) // 3 + 3]  # met partway: the text ends before it
    for stream in (False, True):
        body = body_for("learned", prompt, 24, SETTINGS[0], 0, stop=[stop, "\x00never"], ignore_eos=True)
        if stream:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}))
            parts = [json.loads(ln.removeprefix("data: ")) for ln in conn.getresponse().read().decode().split("\n\n")
                     if ln and ln != "data: [DONE]"]
            conn.close()
            text, finish = "".join(p["choices"][0]["text"] for p in parts), parts[-1]["choices"][0]["finish_reason"]
        else:
            _, out = post(url, body)
            text, finish = out["choices"][0]["text"], out["choices"][0]["finish_reason"]
        assert text == plain[:plain.find(stop)] and finish == "stop", stream
    wait_idle(state)


@pytest.mark.parametrize("batched_weights", [False, True])
def test_engine_rows_join_shift_and_leave_as_if_alone(batched_weights, monkeypatch):
    """The engine without HTTP, on a short context and a small batch so that rows queue, join a
    running batch, shift the cache both ways and leave in any order: each row's tokens equal
    fgpt.inference.generate for it alone (greedy and sampled; learned and rotary + windowed layers),
    with plain weights and with batched ones (from 2 rows up, whatever this machine measures)."""
    import queue
    from fgpt.inference import batched
    from fgpt.inference.decode_layout import onednn_available
    monkeypatch.setattr(batched, "switch_rows", lambda shape, dtype, max_rows, layout: 2 if onednn_available() else None)
    from fgpt.inference.kv_cache import KVCache
    from fgpt.serving.engine import DoneEvent, Engine, Job, Row
    shifts = []
    original = KVCache.shift

    def counting_shift(self, delta):
        shifts.append(delta)
        original(self, delta)

    for config in (GPTConfig(vocab_size=300, n_ctx=40, n_layer=2, n_head=2, n_embd=32),
                   GPTConfig(vocab_size=300, n_ctx=40, n_layer=2, n_head=4, n_embd=32, n_kv_head=1,
                             pos_emb="rope", window=7)):
        params = wide_params(config, seed=3)
        engine = Engine(params, config, max_batch=3, eos_id=-1, batched_weights=batched_weights)
        leaves = tree.leaves(engine.params, is_leaf=lambda x: isinstance(x, batched.BatchedMatrix))
        # for the batch: reordered for its 3 rows (a decode layout's packed weight is for one)
        wrapped = any(isinstance(leaf, batched.BatchedMatrix) and leaf.max_rows == 3 for leaf in leaves)
        assert wrapped == (batched_weights and onednn_available())
        gen = torch.Generator().manual_seed(0)
        jobs = []
        for i in range(10):
            P = int(torch.randint(1, 25, (1,), generator=gen))
            M = int(torch.randint(1, config.n_ctx - P + 1, (1,), generator=gen))
            prompt = torch.randint(0, 300, (P,), generator=gen).tolist()
            sampling = SETTINGS[i % 3]
            events = queue.Queue()
            jobs.append((prompt, M, sampling, i, events))
        KVCache.shift = counting_shift
        try:
            engine.start()
            for prompt, M, sampling, seed, events in jobs:
                engine.submit(Job(prompt, [Row(sampling, torch.Generator().manual_seed(seed), M, events.put)]))
            for prompt, M, sampling, seed, events in jobs:
                got = []
                while not isinstance(event := events.get(timeout=60), DoneEvent):
                    got.append(event.token)
                want = generate(params, config, [prompt], M, sampling=sampling, seed=seed, eos_id=None)[0]
                assert got == want[len(prompt):]
        finally:
            KVCache.shift = original
            engine.stop()
        assert engine.live_rows == 0
    assert any(d < 0 for d in shifts) and any(d > 0 for d in shifts)  # both directions were exercised


# --- real clients -----------------------------------------------------------------------------

def test_openai_client_plain_and_streamed(server, references):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert sorted(m.id for m in client.models.list()) == sorted(CONFIGS)
    prompt = "In a hole in the ground there lived"
    ids = gpt2_encoding().encode(prompt)
    for model in CONFIGS:
        want = reference_text(references, model, ids, 10, SETTINGS[1], 3)
        out = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.9,
                                        seed=3, extra_body={"top_k": 200, "ignore_eos": True})
        assert out.choices[0].text == want and out.usage.completion_tokens == 10
        pieces = client.completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.9,
                                           seed=3, stream=True, extra_body={"top_k": 200, "ignore_eos": True})
        assert "".join(c.choices[0].text for c in pieces if c.choices) == want
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found"


MC_QUESTIONS = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "sky above the sea.", "quantum field."], "label": 0},
    {"ctx": "She opened the door and", "endings": ["walked in.", "the moon.", "seven."], "label": 0},
    {"ctx": "Water boils at", "endings": ["one hundred degrees.", "midnight.", "the cat."], "label": 1},
    {"ctx": "He plays the", "endings": ["guitar.", "Tuesday.", "blue."], "label": 2},
    {"ctx": "To bake bread you need", "endings": ["flour and water.", "a car.", "silence."], "label": 0},
    {"ctx": "The train arrived", "endings": ["on time.", "green.", "under the soup."], "label": 1},
]


def hf_tokenizer_dir(path: Path) -> Path:
    """GPT-2's tokenizer in the Hugging Face layout, written from fgpt's own BPE files (offline).
    transformers 5.x wants the loaded vocab / merges, not their file paths."""
    from transformers import GPT2TokenizerFast
    from fgpt.data.tokenizer import data_dir
    vocab = json.loads((data_dir() / "encoder.json").read_text("utf-8"))
    merges = [tuple(line.split()) for line in (data_dir() / "vocab.bpe").read_text("utf-8").splitlines()[1:] if line]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>")
    ids = gpt2_encoding().encode(" The cat sat, naïvely: 12 mats!")
    assert tok(" The cat sat, naïvely: 12 mats!")["input_ids"] == ids  # the same BPE as tiktoken's
    tok.save_pretrained(path)
    return path


@pytest.mark.slow  # a server under load, a browser, lm-eval or a signal
@pytest.mark.lm_eval
def test_lm_eval_local_completions_accuracy_equals_run_eval(server, checkpoints, tmp_path, capsys, monkeypatch):
    """lm-evaluation-harness's `local-completions` model scores a local multiple-choice task
    through /v1/completions (echo + logprobs); its acc equals `run.eval --task mc`."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    url, _ = server
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in MC_QUESTIONS))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "fgpt_mc.yaml").write_text(
        "task: fgpt_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\n"
        "doc_to_target: label\ntarget_delimiter: ' '\nmetric_list:\n  - metric: acc\n")
    tokenizer = hf_tokenizer_dir(tmp_path / "tokenizer")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from fgpt.evaluation.multiple_choice import read_questions, score_endings
    from run import eval as run_eval
    for model in CONFIGS:
        result = simple_evaluate(
            model="local-completions",
            model_args=f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={tokenizer},max_length=64,num_concurrent=1,max_retries=1,tokenized_requests=True",
            tasks=["fgpt_mc"], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), log_samples=True)
        acc = result["results"]["fgpt_mc"]["acc,none"]
        # beneath the accuracy: each ending's summed logprob equals fgpt's own scoring
        config, params = load_checkpoint(checkpoints[model])
        want_scores = score_endings(params, config, read_questions(data))
        for sample in result["samples"]["fgpt_mc"]:
            got = [float(r[0]) for r in sample["filtered_resps"]]
            ref = [total for total, _ in want_scores[sample["doc_id"]]]
            assert got == pytest.approx(ref, rel=1e-4, abs=1e-4), (model, sample["doc_id"])
        capsys.readouterr()
        run_eval.main(["--checkpoint", str(checkpoints[model]), "--task", "mc", "--data", str(data)])
        want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert want["n"] == len(MC_QUESTIONS)
        assert acc == pytest.approx(want["acc"]), model


@pytest.mark.slow  # a server under load, a browser, lm-eval or a signal
@pytest.mark.browser
def test_playground_streams_into_every_column(server, tmp_path):
    """The page in a real headless chromium: it lists both models as columns, and a submitted
    prompt streams text into each."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    url, state = server
    shot = Path(os.environ.get("FGPT_PLAYGROUND_SHOT", tmp_path / "playground.png"))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.goto(url + "/", timeout=30_000)
            page.wait_for_selector(".column >> nth=1", timeout=30_000)
            assert page.locator(".column").evaluate_all("cs => cs.map(c => c.dataset.model)") == list(CONFIGS)
            page.fill("#prompt", "The old lighthouse keeper")
            page.fill("#max_tokens", "40")
            page.fill("#seed", "1")
            page.click("#go")
            page.wait_for_selector("body[data-done='1']", timeout=60_000)
            outputs = page.locator(".column .output").all_inner_texts()
            assert len(outputs) == 2
            for text in outputs:
                assert text.startswith("The old lighthouse keeper") and len(text) > len("The old lighthouse keeper") + 20
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 0
    wait_idle(state)


# --- bad requests, load, the command line ---------------------------------------------------------

BAD = [
    ("malformed JSON", None, b'{"model": "learned", "prompt": ', 400, "invalid_json"),
    ("not an object", None, b"[1, 2]", 400, None),
    ("unknown model", {"model": "gpt-5", "prompt": "hi"}, None, 404, "model_not_found"),
    ("negative max_tokens", {"model": "learned", "prompt": "hi", "max_tokens": -1}, None, 400, None),
    ("temperature < 0", {"model": "learned", "prompt": "hi", "temperature": -0.5}, None, 400, None),
    ("top_p > 1", {"model": "learned", "prompt": "hi", "top_p": 1.5}, None, 400, None),
    ("n past the batch", {"model": "learned", "prompt": "hi", "n": MAX_BATCH + 1}, None, 400, None),
    ("prompt past n_ctx", {"model": "learned", "prompt": [1] * 60, "max_tokens": 10}, None, 400,
     "context_length_exceeded"),
    ("empty prompt", {"model": "learned", "prompt": ""}, None, 400, None),
    ("token id out of range", {"model": "learned", "prompt": [N_VOCAB]}, None, 400, None),
    ("wrong type", {"model": "learned", "prompt": "hi", "max_tokens": "ten"}, None, 400, None),
    ("unsupported penalty", {"model": "learned", "prompt": "hi", "presence_penalty": 0.5}, None, 400,
     "unsupported_parameter"),
    ("model not a string", {"model": ["learned"], "prompt": "hi"}, None, 400, None),
    ("stream_options not an object", {"model": "learned", "prompt": "hi", "stream_options": "x"}, None, 400, None),
    ("oversized body", None, json.dumps({"model": "learned", "prompt": "x" * (2 << 20)}).encode(), 413,
     "body_too_large"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_the_openai_error_shape_and_the_server_keeps_serving(server, case):
    url, _ = server
    _, body, raw, status, code = case
    got, out = post(url, body, raw=raw)
    assert got == status, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["message"] and out["error"]["type"] == "invalid_request_error"
    if code is not None:
        assert out["error"]["code"] == code
    got, out = post(url, {"model": "learned", "prompt": "still there?", "max_tokens": 2})
    assert got == 200 and len(out["choices"]) == 1


def test_models_and_health(server):
    url, _ = server
    status, body = get(url, "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == list(CONFIGS)
    status, body = get(url, "/health")
    assert status == 200 and set(json.loads(body)["models"]) == set(CONFIGS)
    status, body = get(url, "/")
    assert status == 200 and b"<script>" in body and b"/v1/completions" in body
    # self-contained: no script, style or image fetched from a file or another host
    assert not re.search(rb"""(src|href)\s*=|@import|url\(|https?://""", body, re.IGNORECASE)


@pytest.mark.slow  # a server under load, a browser, lm-eval or a signal
def test_load_with_clients_leaving_mid_stream(server):
    """32 clients x 8 requests on loopback, every fourth request streamed and dropped after its
    first token: every well-formed request is answered and no batch row is left behind."""
    url, state = server
    host, port = url.removeprefix("http://").split(":")
    answered, dropped, failures = [], [], []

    def client(i: int):
        for j in range(8):
            body = {"model": list(CONFIGS)[(i + j) % 2], "prompt": f"client {i} request {j}", "max_tokens": 3 + j % 4,
                    "temperature": 0.8, "seed": i * 8 + j, "ignore_eos": True}
            try:
                if (i + j) % 4 == 0:  # stream, read one event, hang up
                    conn = http.client.HTTPConnection(host, int(port), timeout=60)
                    conn.request("POST", "/v1/completions", json.dumps({**body, "max_tokens": 40, "stream": True}))
                    resp = conn.getresponse()
                    assert resp.status == 200 and resp.readline().startswith(b"data: ")
                    conn.sock.shutdown(socket.SHUT_RDWR)
                    conn.close()
                    dropped.append(1)
                else:
                    status, out = post(url, body)
                    assert status == 200 and out["usage"]["completion_tokens"] == body["max_tokens"], out
                    answered.append(1)
            except Exception as e:  # noqa: BLE001  (collected, asserted below)
                failures.append(repr(e))

    cancelled_before = sum(m.engine.left["cancelled"] for m in state.models.values())
    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads) and not failures, failures[:3]
    assert len(answered) + len(dropped) == 32 * 8
    wait_idle(state)  # the dropped streams' rows left the batch too
    # ... and at least some of them because their client went away, not by running out of tokens
    assert sum(m.engine.left["cancelled"] for m in state.models.values()) > cancelled_before
    assert post(url, {"model": "learned", "prompt": "after the load", "max_tokens": 2})[0] == 200


def run_serve(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "run.serve", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def test_cli_bad_input_is_one_line_and_exit_2(checkpoints, tmp_path, capsys):
    from run import serve
    from run._cli import main_guard
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        ["--checkpoint", str(tmp_path / "missing")],
        ["--checkpoint", str(checkpoints["learned"]), "--checkpoint", str(checkpoints["learned"])],
        ["--checkpoint", str(checkpoints["learned"]), "--name", "a", "--name", "b"],
        ["--checkpoint", str(checkpoints["learned"]), "--port", str(busy.getsockname()[1])],
        ["--checkpoint", str(checkpoints["learned"]), "--max-batch", "0"],
        ["--checkpoint", str(checkpoints["learned"]), "--dtype", "float8"],
    ]
    try:
        for argv in cases:
            with pytest.raises(SystemExit) as e:
                main_guard(lambda: serve.main(argv + ["--port", str(free_port())] if "--port" not in argv else argv))
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2, argv
            assert err[-1].startswith("error: ") and "Traceback" not in "".join(err), (argv, err)
    finally:
        busy.close()


@pytest.mark.slow  # a server under load, a browser, lm-eval or a signal
def test_sigterm_stops_the_server_cleanly(checkpoints):
    port = free_port()
    proc = run_serve("--checkpoint", checkpoints["learned"], "--port", port)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            try:
                if get(f"http://127.0.0.1:{port}", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        assert post(f"http://127.0.0.1:{port}", {"prompt": "hi", "max_tokens": 2})[0] == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "Traceback" not in err, err
    # uvicorn shuts down gracefully, then re-raises the signal: the exit status says SIGTERM (143)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err)
