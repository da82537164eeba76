"""Graph capture made cheaper: one change to tinygrad's `function` (the decorator each decoder layer runs under).

A server captures all of its TinyJit graphs before it says it is ready (model_runner.py), so the seconds a capture
takes are seconds of every start. Most of them are Python: tracing the model's 30 (or 16, or 32) layers and
rewriting the traced graphs. After tracing a layer, `function` renumbers the scratch buffers the layer writes before
reading ("invalid outputs") and, for each node of the layer's graph, recomputes that whole set to test whether the
node is in it: quadratic in the graph's size. On SmolLM2 that was ~40 % of a capture. Computed once, the result is
the same set, numbered in the same order.
"""
from __future__ import annotations
import importlib
from dataclasses import replace
from tinygrad.uop.ops import UOp

function = importlib.import_module("tinygrad.function")     # the module: `tinygrad.function` names the decorator


def _renumber_invalid_outputs(uret: UOp) -> UOp:
  """tinygrad.function.renumber_invalid_outputs, with `invalid_outputs` computed once instead of once per node."""
  invalid = function.invalid_outputs(uret)
  return uret.substitute({b: b.replace(arg=replace(b.arg, slot=i))
                          for i, b in enumerate(x for x in uret.toposort(enter_calls=False) if x in invalid)})


def speed_up_capture() -> None:
  function.renumber_invalid_outputs = _renumber_invalid_outputs
