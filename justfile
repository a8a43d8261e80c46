# fgpt tasks. Arguments are handed to Python untouched, so `just train strategy=custom-fsdp
# nproc=2 --steps 50` works with `strategy=` / `nproc=` in any position.
set positional-arguments

# run the whole test suite
test *args:
    python -m pytest -q "$@"

# the quick part of the suite (no distributed, report or subprocess-heavy tests)
test-fast *args:
    python -m pytest -q -m "not slow" "$@"

# train (default: a small GPT on the built-in corpus, single CPU process)
train *args:
    python -m run.train "$@"

# sample from a checkpoint (default: the newest one `just train` left)
generate *args:
    python -m run.generate "$@"

# OpenAI-compatible completion server + playground: just serve --checkpoint PATH [--checkpoint PATH2 ...]
serve *args:
    python -m run.serve "$@"

# benchmarks: generate | train | loss | parallel | attention | eval | data | profile | serve
bench what *args:
    python -m run.bench "$@"

# the assessment study: writes docs/report.md, its plots and docs/report/results.json
report *args:
    python -m run.report "$@"

# on a CUDA machine: CUDA tests, strategies on NCCL, 124M training and decode speed, one table
gpu-check *args:
    python -m run.bench.gpu_check "$@"

# evaluate a checkpoint: strided perplexity (--data TEXT) or multiple choice (--task mc --data FILE.jsonl)
eval *args:
    python -m run.eval "$@"

# plot training and validation loss of runs: just plot out/a out/b --out runs.png
plot *args:
    python -m run.plot "$@"

# convert a checkpoint: --to-gqa N | --to-safetensors | --to-gguf f32|f16|q8_0, --out PATH
convert *args:
    python -m run.convert "$@"

# tokenise a corpus (text / JSONL / Parquet) into token shards: just prepare --data SRC --out DIR
prepare *args:
    python -m run.prepare "$@"

# what a checkpoint gives up at inference (context use, windows, GQA, length, samples): just probe --checkpoint gpt2/ --out probe/
probe *args:
    python -m run.probe "$@"
