"""tinygrad_internals.py (the kernel cache): a kernel lowered in one process is read back from tinygrad's disk cache in
the next, not lowered again (the code generator's work that tinygrad itself caches in memory only) — HCQ's submitters
too, which read their addresses from tables filled at link time."""
import os
import subprocess
import sys

LOWER_ONE_KERNEL = """
import tinyvllm
from tinygrad import Device, Tensor, codegen
from tinyvllm.tinygrad_internals import keep_lowered_kernels_on_disk
keep_lowered_kernels_on_disk()
Device[Device.DEFAULT]                  # opening the device lowers its own runtime programs, outside any cache
lowered, lower = [], codegen.do_to_program
codegen.do_to_program = lambda ast, renderer: lowered.append(ast.arg.name) or lower(ast, renderer)
print((Tensor.arange(12).reshape(3, 4) * 3 + 1).sum(axis=1).tolist())
print(len(lowered), sum(name.startswith("hcq") for name in lowered))
"""


def test_a_second_process_reads_the_lowered_kernel_back(tmp_path):
  env = {**os.environ, "CACHEDB": str(tmp_path / "cache.db"), "PARALLEL": "0"}   # PARALLEL=0: lowered in-process
  runs = [subprocess.run([sys.executable, "-c", LOWER_ONE_KERNEL], env=env, capture_output=True, text=True, check=True)
          .stdout.split("\n") for _ in range(2)]
  assert runs[0][0] == runs[1][0] == "[22, 70, 118]"
  lowered, submitters = map(int, runs[0][1].split())
  assert lowered > submitters >= 1 and runs[1][1] == "0 0"


def test_a_lowered_kernel_keeps_its_cost_estimate_simplified():
  """A kernel looping a symbolic number of times counts its work as one term per operation times the trip count;
  kept unsimplified in its KernelInfo, that sum is what tinygrad pretty-prints to hash the kernel (UOp.key)."""
  from tinygrad import Tensor, UOp, Variable, codegen
  from tinyvllm.tinygrad_internals import keep_lowered_kernels_on_disk
  keep_lowered_kernels_on_disk()
  before = set(codegen.to_program_cache)
  y = Tensor.arange(256).float()[:Variable("n", 1, 64).bind(10) * 4]     # trip count n << 2, as block loops have
  for i in range(40): y = y * 1.0001 + (i + 0.5)                             # 80 operations in the loop
  assert abs(y.sum().item() - sum(_reference(j) for j in range(40))) < 1e-1
  estimates = [program.src[0].arg.estimates for key, program in codegen.to_program_cache.items() if key not in before]
  sizes = [len(e.ops.toposort()) for e in estimates if isinstance(e.ops, UOp)]
  assert sizes and max(sizes) < 20


def _reference(x: float) -> float:
  for i in range(40): x = x * 1.0001 + (i + 0.5)
  return x
