"""Captured graphs kept in tinygrad's cache db: a second process loads what the first one captured, and its tokens are
the first one's (greedy and seeded sampled, with logprobs), with no graph captured at all. The first one compiles
every kernel of its graphs in one batch before it captures them. A loaded graph's kernels
come with the hash the capturing process computed (UOp.key, not recomputed on load): it must be the hash of what
was loaded."""
import json
import os
import subprocess
import sys

RUN = """
import json
import tinyvllm.tinygrad_internals as internals
from tinyvllm import EngineArgs, LLMEngine, SamplingParams
with_key, kernels = internals._program_with_key, []
internals._program_with_key = lambda key, args: kernels.append(with_key(key, args)) or kernels[-1]
from tinygrad import codegen
from tinygrad.engine import realize
from tinygrad.uop.ops import Ops
lower_and_compile, in_captures = realize.lower_and_compile, set()
def counting(linear):              # kernels a capture compiles itself (the queue runtime's submitters have no name)
  found = [a for c in linear.toposort() if c.op is Ops.CALL and (a := realize._get_call_to_compile(c)) is not None]
  in_captures.update(codegen.to_program_key(*a) for a in found if a[0].op is Ops.SINK and a[0].arg.name != "test"
                     and codegen.to_program_key(*a) not in codegen.to_program_cache)
  return lower_and_compile(linear)
realize.lower_and_compile = counting
engine = LLMEngine(EngineArgs(load_format="dummy", shape="tiny", max_model_len=128, max_num_batched_tokens=16,
                              max_num_seqs=4, kv_cache_memory_gb=0.01))
engine.warmup()
greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=8, logprobs=2, ignore_eos=True)
engine.add_request(list(range(100, 140)), greedy, request_id="long")
engine.add_request(list(range(300, 305)), greedy, request_id="short")
engine.add_request(list(range(200, 230)), sampled, request_id="sampled")
tokens = {}
while engine.has_unfinished_requests():
  for out in engine.step():
    if out.finished: tokens[out.request_id] = out.outputs[0].token_ids
import hashlib
fresh = lambda u: hashlib.sha256(str((u.op, u.dtype, u.arg)).encode() + b"".join(s.key for s in u.src)).digest()
print(json.dumps({"tokens": tokens, "builds": engine.runner.graphs.builds, "loads": engine.runner.graphs.loads,
                  "kernels": len(kernels), "wrong_keys": sum(u.key != fresh(u) for u in kernels),
                  "compiled_first": engine.runner.graphs.kernels_compiled, "compiled_in_captures": len(in_captures)}))
"""


def run(cache_db: str) -> dict:
  env = {**os.environ, "CACHEDB": cache_db}
  out = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_graphs_and_gets_the_same_tokens(tmp_path):
  db = str(tmp_path / "cache.db")
  first, second = run(db), run(db)
  assert first["builds"] > 0 and first["loads"] == 0
  assert first["compiled_first"] > 100 and first["compiled_in_captures"] == 0     # all in one batch before capturing
  assert second["builds"] == 0 and second["loads"] == first["builds"]
  assert second["tokens"] == first["tokens"] and len(first["tokens"]) == 3
  assert second["kernels"] > 0 and second["wrong_keys"] == 0


KEEP_ONE_VERSION = """
import tinyvllm
from tinyvllm.tinygrad_internals import store_graph, stored_graph
store_graph("code a", "graph 1", b"a1")
store_graph("code a", "graph 2", b"a2")
print(stored_graph("code a", "graph 1") == b"a1", stored_graph("code a", "graph 2") == b"a2")
store_graph("code b", "graph 1", b"b1")
print(stored_graph("code a", "graph 1"), stored_graph("code a", "graph 2"), stored_graph("code b", "graph 1") == b"b1")
"""


def test_storing_a_graph_drops_those_of_other_code(tmp_path):
  env = {**os.environ, "CACHEDB": str(tmp_path / "cache.db")}
  out = subprocess.run([sys.executable, "-c", KEEP_ONE_VERSION], env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split("\n")[:2] == ["True True", "None None True"]


def test_a_graph_split_into_device_graphs_is_found_by_its_program():
  """On a GPU TinyJit groups a capture's kernels into the device's graphs (CUDA graphs) after the queue runtime
  compiled it: the store finds the compiled program under the key it had before that grouping."""
  from tinygrad import Tensor, TinyJit
  from tinygrad.engine.jit import create_graph_call
  from tinyvllm.tinygrad_internals import _unsplit

  @TinyJit
  def f(x: Tensor) -> Tensor: return ((x + 1).contiguous() * 2).contiguous().sum().realize()
  for i in range(3): f(Tensor([float(i)] * 8).clone().realize())
  program = f.captured._linear
  calls = program.src
  split = program.replace(src=(create_graph_call(list(calls[:2])), *calls[2:]))
  assert split.key != program.key and _unsplit(split).key == program.key
