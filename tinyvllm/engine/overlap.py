"""Async scheduling: the engine's step, run so that the host's work hides behind the device's.

A GPU computes a step in a few milliseconds, and the host's share of it, scheduling a batch of 256 sequences,
packing its inputs, appending tokens and building outputs, takes as long again in Python. `LLMEngine.step`
(engine.py) does the three parts one after the other: schedule → run → finish. `Overlap.step` does the same parts,
interleaved. While the device runs step k, the host schedules step k+1 and packs its inputs, the tokens step k is
sampling being the only thing it cannot know yet: each sequence counts that token as *pending*
(`Sequence.num_pending_tokens`: it has a slot and a position, just no value). Once step k's tokens are read back,
they are written into step k+1's inputs, step k+1 is queued, and only then are step k's tokens appended, its stops
checked and its outputs built, while the device runs step k+1:

    host:    prepare k+1 │ read k │ launch k+1 │ finish k: append, stop, outputs │ prepare k+2 │ read k+1 │ ...
    device:  ──── step k ────────────┤─────────── step k+1 ────────────────────────────────────┤── step k+2

A sequence that stops at step k was scheduled into step k+1 anyway; that row's token is dropped. A step whose
sampler needs the previous tokens' values on the host (penalties count them) is prepared only after they arrive.
Every token is the one the plain step gives (tests/engine/test_engine.py runs a mixed workload both ways).
"""
from __future__ import annotations
from typing import TYPE_CHECKING
from tinyvllm.engine.protocol import RequestOutput
from tinyvllm.runner.model_runner import PreparedStep
if TYPE_CHECKING: from tinyvllm.engine.engine import LLMEngine


class Overlap:
  def __init__(self, engine: LLMEngine):
    self.engine = engine
    self.in_flight: PreparedStep | None = None     # the step queued on the device, its tokens not read yet

  def step(self) -> list[RequestOutput]:
    engine, runner = self.engine, self.engine.runner
    if self.in_flight is None: self.in_flight = self._launch(self._prepare())
    if self.in_flight is None: return []                                  # nothing could be scheduled
    step = self.in_flight
    # while the device computes `step`; not where the next step should check drafts: they follow its tokens
    ahead = self._prepare() if runner.can_run_ahead(step) and not engine.wants_drafts() else None
    result = runner.collect(step)                                         # waits for the device
    self.in_flight = self._launch(ahead, result)                          # the device is busy again
    for item in step.scheduled:
      if item.seq in result.sampled: item.seq.num_pending_tokens -= 1     # its token has a value now
    return engine.finish(step, result)

  def _prepare(self) -> PreparedStep | None:
    step = self.engine.prepare()
    for item in step.scheduled if step else []:
      if item.samples: item.seq.num_pending_tokens += 1                  # its next token is on the way
    return step

  def _launch(self, step: PreparedStep | None, before=None) -> PreparedStep | None:
    return None if step is None else self.engine.runner.launch(step, before)   # forward pass + sampling, queued
