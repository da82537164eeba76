"""An OpenAI-compatible HTTP server for tinyvllm: `python serve.py`, or `OpenAIServer` + `serve` from code.

    protocol.py   request JSON → token ids + SamplingParams, and the OpenAI error shape
    responses.py  engine outputs → OpenAI JSON, whole or as server-sent-event chunks
    api.py        the aiohttp app: routes, guards (key, rate limit, admission, timeout), lifecycle
    metrics.py    GET /metrics in Prometheus' text format with vLLM's names
    limits.py     per-client token buckets
    logs.py       text or JSON log lines
    static/       the chat page served at /
"""
from tinyvllm.server.api import OpenAIServer, ServerConfig, serve, start

__all__ = ["OpenAIServer", "ServerConfig", "serve", "start"]
