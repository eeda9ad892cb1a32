"""The latency model: a request's ttft and latency from measured LLMPerf records.

Measured per-request latencies of Llama-2-70B APIs (LLMPerf leaderboard,
``llmperf_leaderboard_latency/individual/<provider>.json``, read by
:func:`bench.replay.sources.load_provider`; ~550 prompt and ~150 output tokens per request,
December 2023). Per request one healthy record (no error) of the provider is drawn, and

- ``ttft = record.ttft_s + PREFILL_MS_PER_TOKEN * max(0, prompt_tokens -
  record.number_input_tokens)``: the record's time to first token (network, queueing,
  prefill of its own 550 tokens) plus the prefill of the longer prompt. ``PREFILL_MS_PER_TOKEN
  = 0.1`` ms: a 70B model spends ~2 x 70e9 = 1.4e11 FLOP per prompt token; an 8 x A100
  node (8 x 312 TFLOP/s bf16) at ~50 % utilisation does ~1.25e15 FLOP/s, so ~0.11 ms per
  token, ~10k prompt tokens/s. Shorter prompts get no credit: 550 tokens cost ~55 ms, well
  inside the record's network and queueing time.
- ``tpot = record.inter_token_latency_s`` (LLMPerf's mean time per output token).
- ``latency = ttft + tpot * (completion_tokens - 1)`` (genmon's aggregates invert exactly
  this to get time per output token).

A failed (rate-limited) request's latency is the record's ttft without prefill (the gateway
rejects before any model work).

The healthy default is ``fireworks_70b`` (150 records, none failed; ttft median 0.52 s,
tpot median 24 ms); the slow regime's default is ``replicate_70b`` (ttft median 1.19 s,
tpot median 97 ms: end-to-end about 3-4 times slower).
"""

from __future__ import annotations

import numpy as np

from bench.replay.sources import Provider

DEFAULT_PROVIDER = "fireworks_70b"
SLOW_PROVIDER = "replicate_70b"
#: Prefill cost of one prompt token beyond the record's (see the module docstring).
PREFILL_MS_PER_TOKEN = 0.1


def timings(
    provider: Provider, records: np.ndarray, prompt_tokens: np.ndarray, completion: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(ttft_ms, latency_ms) of answered requests by the module's latency model."""
    extra = np.maximum(prompt_tokens - provider.input_tokens[records], 0)
    ttft = provider.ttft_s[records] * 1e3 + PREFILL_MS_PER_TOKEN * extra
    tpot = provider.tpot_s[records] * 1e3
    return ttft, ttft + tpot * np.maximum(completion - 1, 0)


def _record(perf: Provider, row: int) -> str:
    return f"{perf.name}:{perf.positions[row]}"
