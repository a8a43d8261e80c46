"""On a CUDA device: transformers parity (logits, gradients, greedy text), int8 and bf16
decoding, training on the GPU against the same run on CPU, and the flex window kernel's
backward (CUDA only). Skipped without a GPU; `just gpu-check` runs these first.

References are the CPU path's (already checked against transformers by the rest of the
suite) and transformers itself on the same device."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad_and_value

from fgpt import GPTConfig, forward, init_params, load_checkpoint, loss_fn, tree
from fgpt.inference import int8
from fgpt.inference.generate import Sampling, decode_layout, generate
from fgpt.training.train import TrainConfig, train
from helpers import greedy_by_recomputation
from hf_reference import hf_model, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
SHAPE = (101, 64, 3, 4, 64)  # vocab, n_ctx, n_layer, n_head, n_embd


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
    """TF32 would round fp32 matmuls to 10 mantissa bits; parity is checked in real fp32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    model = hf_model(*SHAPE)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    config, params = load_checkpoint(path, device="cuda")
    return model.to(CUDA), config, params


def tokens(vocab: int, T: int, B: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1)).to(CUDA)


def test_logits_and_gradients_match_transformers_on_cuda(hf_and_ours):
    model, config, params = hf_and_ours
    x = tokens(config.vocab_size, config.n_ctx)
    out = model(input_ids=x, labels=x)
    assert rel_err(forward(params, x, config), out.logits) < 1e-5
    grads, loss = grad_and_value(lambda p: loss_fn(p, x[:, :-1], x[:, 1:], config))(params)
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
    out.loss.backward()
    theirs = {k.removeprefix("transformer."): p.grad for k, p in model.named_parameters()}
    for path, g in tree.flatten(grads).items():
        assert rel_err(g, theirs[path]) < 1e-4, path
    model.zero_grad(set_to_none=True)


def test_bf16_logits_stay_near_fp32_on_cuda(hf_and_ours):
    _, config, params = hf_and_ours
    x = tokens(config.vocab_size, config.n_ctx)
    assert rel_err(forward(tree.cast(params, torch.bfloat16), x, config).float(), forward(params, x, config)) < 3e-2


def test_greedy_decoding_equals_transformers_on_cuda(hf_and_ours):
    model, config, params = hf_and_ours
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt], device=CUDA), max_new_tokens=40, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0].tolist()
    got = generate(decode_layout(params), config, [prompt], 40, sampling=Sampling(temperature=0), ignore_eos=True)
    assert got == [ref]


def test_int8_decoding_on_cuda_equals_int8_on_cpu(hf_and_ours):
    _, config, params = hf_and_ours
    prompt = [3, 1, 4, 1, 5]
    greedy = dict(sampling=Sampling(temperature=0), ignore_eos=True)
    on_cuda = generate(decode_layout(int8.quantize(params)), config, [prompt], 30, **greedy)
    cpu = tree.to_device(params, "cpu")
    x = tokens(config.vocab_size, config.n_ctx).cpu()
    logits_cpu = forward(int8.quantize(cpu), x, config)
    logits_cuda = forward(int8.quantize(params), x.to(CUDA), config).cpu()
    assert rel_err(logits_cuda, logits_cpu) < 2e-2  # CPU's kernel rounds its inputs to bf16
    assert rel_err(logits_cuda, forward(cpu, x, config)) < 5e-2  # int8 against fp32 itself
    # the cached decode against recomputing every step with the same int8 tree on CUDA
    ref, _ = greedy_by_recomputation(int8.quantize(params), config, torch.tensor([prompt], device=CUDA), 30)
    assert on_cuda == ref.tolist()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_follows_the_cpu_run(precision, text_file):
    cfg = dict(model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=64), data=str(text_file),
               steps=8, batch_size=4, lr=3e-3, warmup=2, eval_interval=0, checkpoint_interval=0,
               progress=False, precision=precision)
    gpu = [m["loss"] for m in train(TrainConfig(**cfg, device="cuda")).metrics]
    cpu = [m["loss"] for m in train(TrainConfig(**cfg, device="cpu")).metrics]
    assert gpu[-1] < gpu[0] - 1.0
    assert gpu == pytest.approx(cpu, rel=1e-3 if precision == "fp32" else 3e-2)


def test_flex_window_kernel_trains_like_the_band_kernel_on_cuda():
    config = GPTConfig(vocab_size=97, n_ctx=256, n_layer=2, n_head=4, n_embd=64, n_kv_head=2, window=48)
    params = init_params(config, seed=0, device="cuda")
    x = tokens(config.vocab_size, config.n_ctx)

    def differentiate(kernel: str):
        return grad_and_value(lambda p: loss_fn(p, x[:, :-1], x[:, 1:], config, window_kernel=kernel))(params)
    band_grads, band_loss = differentiate("band")
    flex_grads, flex_loss = differentiate("flex")
    assert float(flex_loss) == pytest.approx(float(band_loss), rel=1e-4)
    for path, g in tree.flatten(flex_grads).items():
        assert rel_err(g, tree.flatten(band_grads)[path]) < 1e-3, path
