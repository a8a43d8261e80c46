"""Serving completions over HTTP: engine (continuous batching), app (the OpenAI-compatible API
and the playground page). The command is run/serve.py; docs/serve.md describes both."""
