"""Graph capture made cheaper: every decoder layer traced once, not once per layer.

A server captures all of its TinyJit graphs before it says it is ready (model_runner.py), so the seconds a capture
takes are seconds of every start. Most of them are Python: tracing the model's layers into tinygrad's graph and
rewriting what was traced. Each layer runs as a tinygrad `function` (a CALL of a body whose inputs are parameters),
so the scheduler and code generator see one body, not num_layers bodies; but tracing the body, running the layer's
Python to build it, still happened once per layer (~0.3 s each on a 2-core CPU for SmolLM2's 30 layers, a third of
a capture).

    layer 0:  trace fxn(layer 0, x, ...)  ──►  body(p0, p1, ..., pn)  ──►  CALL(body, layer 0's weights, x, ...)
    layer 1:  trace once more, check that the body is the same one (tinygrad's graphs are hash-consed: same
              structure, same object), else trace every layer
    layer k:                                   body                   ──►  CALL(body, layer k's weights, x, ...)

The layer object is an argument, so its weights are explicit parameters in a fixed order (tinygrad's state-dict
walk of the arguments); whatever else the body reads (a buffer shared by every layer) stays an implicit input, and
the check on layer 1 confirms that it is the same for both.

One other change, to tinygrad's own `function`: after tracing, it renumbers the scratch buffers a body writes
before reading ("invalid outputs") and, for each node of the body, recomputed that whole set to test whether the
node is in it: quadratic in the body's size (~40 % of a capture on SmolLM2). Computed once, the result is the same
set, numbered in the same order.
"""
from __future__ import annotations
import collections
import importlib
from dataclasses import replace
from typing import Callable
from tinygrad import Tensor
from tinygrad.helpers import Context, dedup
from tinygrad.nn.state import get_state_dict
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import Ops, UOp, graph_rewrite, ssimplify

function = importlib.import_module("tinygrad.function")     # the module: `tinygrad.function` names the decorator


def _renumber_invalid_outputs(uret: UOp) -> UOp:
  """tinygrad.function.renumber_invalid_outputs, with `invalid_outputs` computed once instead of once per node."""
  invalid = function.invalid_outputs(uret)
  return uret.substitute({b: b.replace(arg=replace(b.arg, slot=i))
                          for i, b in enumerate(x for x in uret.toposort(enter_calls=False) if x in invalid)})


def _sum_of_terms(x):
  """ssimplify of a sum, its terms gathered first: a graph's cost estimate adds up every kernel's (symbolic in the
  context length), hundreds of terms, most of them one of a few that each layer repeats; simplified whole, the sum
  took a quarter of a capture."""
  if not isinstance(x, UOp): return x
  const, counts, stack = 0, collections.Counter(), [x]
  while stack:
    u = stack.pop()
    if u.op is Ops.ADD: stack.extend(u.src)
    elif u.op is Ops.CONST: const += u.arg
    else: counts[u] += 1
  return ssimplify(sum((u * n for u, n in counts.items()), start=x.const_like(const)))


def speed_up_capture() -> None:
  function.renumber_invalid_outputs = _renumber_invalid_outputs
  Estimates.simplify = lambda self: Estimates(_sum_of_terms(self.ops), _sum_of_terms(self.lds), _sum_of_terms(self.mem))


class SameBody:
  """`fxn(*args)` as a tinygrad `function` (precompile=True, implicit inputs allowed) whose body is traced on the
  first two calls and reused for the next ones whose inputs have the same shapes. Make one per traced forward pass:
  within it every call shares the Python state the body reads besides its arguments."""
  def __init__(self, fxn: Callable[..., Tensor]):
    self.fxn, self.name = fxn, fxn.__qualname__
    self.bodies: dict[tuple, tuple[UOp, list[UOp]]] = {}    # input shapes -> (body, implicit inputs)
    self.traced: dict[tuple, int] = {}                      # input shapes -> times traced
    self.reuse = True

  def __call__(self, *args) -> Tensor:
    inputs = dedup([u for t in get_state_dict(args, tensor_type=(Tensor, UOp)).values() if (u := t._uop).device is not None])
    key = tuple((u.shape, u.dtype, u.device) for u in inputs)
    if self.reuse and self.traced.get(key, 0) >= 2: body, implicit = self.bodies[key]
    else:
      body, implicit = self._trace(args, inputs)
      if self.traced.get(key, 0) == 1 and not _same(self.bodies[key], (body, implicit)): self.reuse = False
      self.bodies.setdefault(key, (body, implicit))
      self.traced[key] = self.traced.get(key, 0) + 1
    return Tensor(body.call(*inputs, *implicit, name=self.name, precompile=True).gettuple(0))

  def _trace(self, args: tuple, inputs: list[UOp]) -> tuple[UOp, list[UOp]]:
    """tinygrad.function's tracing: run fxn with device work off, turn its inputs into parameters, collect what
    else it reads as implicit inputs."""
    with Context(ALLOW_DEVICE_USAGE=0):
      function._function.depth += 1
      try: out = self.fxn(*args)
      finally: function._function.depth -= 1
    body = out.uop.substitute({u: u.param_like(i) for i, u in enumerate(inputs)})
    found = list(inputs)
    body = graph_rewrite(body, function.pm_ctx, (found, function.invalid_outputs(body)), bottom_up=True,
                         name="get_implicit_inputs")
    return _renumber_invalid_outputs(body), found[len(inputs):]


def _same(a: tuple[UOp, list[UOp]], b: tuple[UOp, list[UOp]]) -> bool:
  return a[0] is b[0] and len(a[1]) == len(b[1]) and all(x is y for x, y in zip(a[1], b[1]))
