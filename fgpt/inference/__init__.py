"""Decoding: sampling and generation, the KV cache, weight-only int8, decode layouts."""
