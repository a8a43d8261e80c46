# fgpt tasks. `just train strategy=custom-fsdp nproc=2 --steps 50` style arguments work in
# any order: the recipes hand everything to Python, which reads `strategy=` / `nproc=`.
set positional-arguments

# run the whole test suite
test *args:
    python -m pytest -q "$@"
