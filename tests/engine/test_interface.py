"""The engine interface (engine/protocol.py): LLMEngine and DataParallelEngine each have every method of
the `Engine` protocol, with the protocol's parameters. Checked on the classes, so nothing is loaded here; the
attributes, set when an engine is built, are checked on the engines that test_server.py, test_diffusion.py and
test_data_parallel.py build (`isinstance(engine, Engine)`)."""
from __future__ import annotations
import inspect
import pytest
from tinyvllm.parallel.data_parallel import DataParallelEngine
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine.protocol import Engine, Request
from tinyvllm.sampling_params import SamplingParams

METHODS = sorted(name for name, member in vars(Engine).items() if inspect.isfunction(member) and not name.startswith("_"))
ATTRIBUTES = sorted(Engine.__annotations__)


def differences(cls: type) -> list[str]:
  """Where `cls` departs from the protocol: a missing method, or a parameter (or return) that differs in name, kind,
  default or annotation. `RequestT` in the protocol stands for the engine's own request record, so it matches any."""
  found = []
  for name in METHODS:
    method = getattr(cls, name, None)
    if not callable(method):
      found.append(f"{cls.__name__}.{name} is missing")
      continue
    want, have = inspect.signature(getattr(Engine, name)), inspect.signature(method)
    if list(want.parameters) != list(have.parameters):
      found.append(f"{cls.__name__}.{name}{have} has other parameters than {name}{want}")
      continue
    for p, q in zip(want.parameters.values(), have.parameters.values()):
      if (p.kind, p.default) != (q.kind, q.default) or not same_annotation(p.annotation, q.annotation):
        found.append(f"{cls.__name__}.{name}: parameter {q} is not {p}")
    if not same_annotation(want.return_annotation, have.return_annotation):
      found.append(f"{cls.__name__}.{name} returns {have.return_annotation}, not {want.return_annotation}")
  return found


def same_annotation(want, have) -> bool: return want is inspect.Parameter.empty or "RequestT" in want or want == have


@pytest.mark.parametrize("cls", [LLMEngine, DataParallelEngine])
def test_every_engine_has_the_protocols_methods(cls):
  assert differences(cls) == []


def test_the_check_catches_a_missing_method_and_a_changed_parameter():
  class NoWarmup(LLMEngine): warmup = None
  class RenamedParameter(LLMEngine):
    def abort_request(self, rid: str) -> None: pass
  class OtherDefault(LLMEngine):
    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = "x") -> Request: pass
  class OtherReturn(LLMEngine):
    def stats(self) -> dict: pass
  assert differences(NoWarmup) == ["NoWarmup.warmup is missing"]
  assert len(differences(RenamedParameter)) == 1 and "abort_request(self, rid" in differences(RenamedParameter)[0]
  assert len(differences(OtherDefault)) == 1 and "request_id" in differences(OtherDefault)[0]
  assert differences(OtherReturn) == ["OtherReturn.stats returns dict, not EngineStats"]


def fake_engine(without: str | None = None) -> object:
  """An object with every member of the protocol but `without`."""
  members = {**{name: lambda self, *args: None for name in METHODS}, **dict.fromkeys(ATTRIBUTES)}
  members.pop(without, None)
  return type("Fake", (), members)()


def test_isinstance_needs_every_member():
  """`Engine` is runtime-checkable: an object is an Engine when it has every method and attribute (isinstance looks
  at names only; `differences` compares the parameters too)."""
  assert METHODS == ["abort_request", "admit", "has_unfinished_requests", "make_request", "stats", "step", "warmup"]
  assert ATTRIBUTES == ["max_model_len", "model_config", "tokenizer"]
  assert isinstance(fake_engine(), Engine)
  for name in METHODS + ATTRIBUTES: assert not isinstance(fake_engine(without=name), Engine), name
