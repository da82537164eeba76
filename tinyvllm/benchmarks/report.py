"""How results leave a benchmark: a progress bar while it runs, a table and a JSON file when it is done.

A result is a dict of *columns*, each a nested dict of metrics; the first column is tinyvllm and every other one a
peer measured on the same machine right after it (or, for `prefix`, the same engine with the prefix cache off).
The table shows a few headline metrics per column and the ratio first/other for each of them:

    metric                 tinyvllm   llama.cpp   tinyvllm/llama.cpp
    decode tok/s             41.3        120.5          0.34

For tokens/s a ratio above 1 means tinyvllm is faster; for milliseconds, that it is slower. The JSON file holds
every metric, the run's configuration and the machine's facts (CPU, cores, GPUs, device, tinygrad version, git commit,
load average).
"""
from __future__ import annotations
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

Row = tuple[str, str]      # (label, dotted path into a column's metrics, e.g. "ttft_ms.mean")


class Progress:
  """`label [#####.....] 5/10 3.2s` on one line of stderr, redrawn with \\r; when stderr is not a terminal (a log
  file), just the last state, once, at `close`."""
  def __init__(self, total: int, label: str, width: int = 30, enabled: bool = True):
    self.total, self.label, self.width, self.done = total, label, width, 0
    self.start, self.enabled, self.tty = time.perf_counter(), enabled, sys.stderr.isatty()

  def _line(self) -> str:
    filled = self.width * self.done // max(self.total, 1)
    return f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} " \
           f"{time.perf_counter() - self.start:.1f}s"

  def update(self, n: int = 1) -> None:
    self.done += n
    if self.enabled and self.tty:
      sys.stderr.write(f"\r{self._line()}")
      sys.stderr.flush()

  def close(self) -> None:
    if self.enabled: sys.stderr.write("\n" if self.tty else f"{self._line()}\n")
    sys.stderr.flush()


def lookup(metrics: dict, path: str) -> float | None:
  for key in path.split("."):
    if not isinstance(metrics, dict) or key not in metrics: return None
    metrics = metrics[key]
  return metrics if isinstance(metrics, (int, float)) else None


# headline rows that are tallies, not speeds: no ratio
COUNTS = {"completed", "failed", "graph_builds_before", "graph_builds_after", "graph_builds"}


def ratios(columns: dict[str, dict], rows: list[Row]) -> dict[str, dict[str, float]]:
  """first column / each other column, for every headline speed or latency both have."""
  (first, ref), others = next(iter(columns.items())), list(columns.items())[1:]
  out: dict[str, dict[str, float]] = {}
  for name, metrics in others:
    pairs = {path: (lookup(ref, path), lookup(metrics, path)) for _, path in rows if path not in COUNTS}
    out[f"{first}/{name}"] = {path: a / b for path, (a, b) in pairs.items() if a is not None and b}
  return out


def _cell(value: float | None) -> str:
  if value is None: return "-"
  return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def table(title: str, rows: list[Row], columns: dict[str, dict]) -> str:
  ratio_cols = ratios(columns, rows)
  header = ["metric", *columns, *ratio_cols]
  body = [[label, *(_cell(lookup(m, path)) for m in columns.values()),
           *(_cell(r.get(path)) for r in ratio_cols.values())] for label, path in rows]
  widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
  fmt = lambda line: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
  rule = "=" * len(fmt(header))
  return "\n".join([f" {title} ".center(len(rule), "="), fmt(header), *map(fmt, body), rule])


def describe_workload(summary: dict) -> str:
  """One line from `workloads.summary`: `64 requests, prompt 64-192 tokens (mean 127), ..., 31 greedy, 3 logprobs`."""
  lengths = [f"{name} {s['min']}-{s['max']} tokens (mean {s['mean']:.0f})"
             for name, s in ((name, summary[f"{name}_len"]) for name in ("prompt", "output"))]
  uses = [f"{count} {name}" for name, count in summary.items()
          if isinstance(count, int) and count and name != "requests"]
  return ", ".join([f"{summary['requests']} requests", *lengths, *uses])


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"): return line.split(":", 1)[1].strip()
  except OSError: pass
  return platform.processor() or platform.machine()


def _git_commit() -> str | None:
  """The checkout's commit, "-dirty" when files differ from it."""
  try: return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
  except (OSError, subprocess.SubprocessError): return None


def _gpus() -> list[str]:
  """NVIDIA GPU names from nvidia-smi, if there is one."""
  try: return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError): return []


def machine_info(device: str) -> dict:
  return {"cpu": _cpu_model(), "cores": os.cpu_count(), "gpus": _gpus(), "device": device,
          "platform": platform.platform(), "python": platform.python_version(),
          "tinygrad": importlib.metadata.version("tinygrad"), "tinyvllm_commit": _git_commit(),
          "load_average": os.getloadavg(),    # others' work on the machine: on a busy one, numbers are noisier
          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_json(path: str | Path, result: dict) -> None:
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  Path(path).write_text(json.dumps(result, indent=2) + "\n")
