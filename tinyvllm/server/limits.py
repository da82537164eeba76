"""Per-client rate limiting with token buckets.

Each client (a remote address) owns a bucket of up to `burst` tokens that refills at `rate` tokens per second.
A request takes one token; with none left it is refused with 429 and told how long until the next token:

    rate=2/s, burst=2:   t=0.0 ✓✓✗ (retry after 0.5 s)    t=0.5 ✓    t=1.5 ✓✓

Buckets that have filled up again carry no information, so they are dropped when the table grows large.

The same buckets slow down API-key guessing: a failed attempt takes a token, and a client with none left is refused
before its key is even compared.
"""
from __future__ import annotations
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
  tokens: float
  updated: float


class RateLimiter:
  MAX_CLIENTS = 4096

  def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
    if rate <= 0: raise ValueError(f"rate limit must be positive, got {rate}")
    self.rate, self.burst, self.clock = rate, burst or max(1.0, rate), clock
    self.buckets: dict[str, _Bucket] = {}

  def acquire(self, client: str) -> float:
    """Take one token for `client`: 0 if allowed, else the seconds to wait before the next one is available."""
    wait = self.wait(client)
    if not wait: self.buckets[client].tokens -= 1
    return wait

  def wait(self, client: str) -> float:
    """Seconds until `client` has a token, taking none: 0 if it has one now."""
    now = self.clock()
    bucket = self.buckets.get(client) or self._new_bucket(client, now)
    bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
    bucket.updated = now
    return 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate

  def _new_bucket(self, client: str, now: float) -> _Bucket:
    if len(self.buckets) >= self.MAX_CLIENTS: self._forget_full(now)
    self.buckets[client] = bucket = _Bucket(self.burst, now)
    return bucket

  def _forget_full(self, now: float) -> None:
    self.buckets = {c: b for c, b in self.buckets.items() if b.tokens + (now - b.updated) * self.rate < self.burst}
