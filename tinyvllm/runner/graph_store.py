"""Captured graphs kept between processes, so that a second start loads its graphs instead of capturing them.

Capturing the runner's bounded set of graphs is most of a start (SmolLM2's 23 on a 2-core CPU: ~85 s; Llama-1B's 29
on an H100: ~135 s). A captured graph is a list of compiled programs and the buffers they read and write; this
module stores it in tinygrad's cache db under a key of everything that decides it, and a later start with the same
key loads it (SmolLM2's 23: ~25 s, most of it encoding tinygrad's command buffers, built per process):

    capture:  graph ──► programs + buffers, each buffer by a name  ──► cache db[key]
    load:     cache db[key] ──► programs, buffers looked up by name in this process ──► graph.jit

A buffer's name says what it is, not where it lives: `weight model.layers.3.mlp.up_proj.weight #0`,
`k pool 5 #0`, `logits 64 #0`, `inputs #0` (the graph's own input buffer). Scratch buffers inside the graph are
made fresh. Storing a graph drops those another version of tinyvllm's code stored (they could never load again).
The pickling itself leans on tinygrad's internals: tinygrad_internals.py (dump_graph, load_graph).
"""
from __future__ import annotations
import functools
import hashlib
import importlib.metadata
import os
import pathlib
from typing import TYPE_CHECKING
from tinygrad.device import Buffer, MultiBuffer
from tinygrad.helpers import ContextVar
from tinygrad.nn.state import get_state_dict
from tinyvllm.tinygrad_internals import dump_graph, forget_captures, load_graph, store_graph, stored_graph
if TYPE_CHECKING: from tinyvllm.runner.graphs import Graphs


@functools.cache
def source_digest() -> str:
  """A hash of tinyvllm's code (the server and benchmarks aside): a captured graph is stored under it."""
  root = pathlib.Path(__file__).parents[1]
  files = sorted(p for p in root.rglob("*.py") if not {"server", "benchmarks"} & set(p.relative_to(root).parts))
  return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


class GraphStore:
  def __init__(self, graphs: Graphs):
    self.graphs = graphs
    self.unstored: list[tuple[str, object]] = []     # (key, graph) captured, not yet in the cache db

  def load(self, shape, graph) -> bool:
    """Give `graph` the jit an earlier process stored for this key; False (and remembered for `store_captured`) if
    there is none, so that the graph captures on its first call."""
    names = self.buffer_names(graph)
    key = self.key(shape, names)
    if (data := stored_graph(source_digest(), key)) is None:
      self.unstored.append((key, graph))
      return False
    graph.jit = load_graph(data, names)
    return True

  def store_captured(self) -> None:
    """Put the graphs captured so far into the cache db, for the next start."""
    for key, graph in self.unstored:
      if graph.jit.captured is None: continue
      data = dump_graph(graph.jit, {id(b): name for name, b in self.buffer_names(graph).items()})
      if data is not None: store_graph(source_digest(), key, data)
    self.unstored = [(k, g) for k, g in self.unstored if g.jit.captured is None]
    forget_captures()

  def buffer_names(self, graph) -> dict[str, Buffer]:
    """Every buffer a graph reads or writes that is not its own scratch, by a name another process gives the same
    buffer: the weights, the KV pools, the logits buffers, the graph's inputs."""
    graphs = self.graphs
    tensors = {f"weight {name}": t.uop.buffer for name, t in get_state_dict(graphs.model).items()}
    tensors |= {f"{kv} pool {layer}": pools[i].uop.buffer for layer, pools in enumerate(graphs.kv_cache)
                for i, kv in enumerate("kv")}
    tensors |= {f"logits {rows}": t.uop.buffer for rows, t in graphs.logits_buffers.items()}
    tensors |= graph.own_buffers()
    return {f"{name} #{i}": b for name, buf in tensors.items()
            for i, b in enumerate(buf.bufs if isinstance(buf, MultiBuffer) else [buf])}

  def key(self, shape, names: dict[str, Buffer]) -> str:
    """What decides a captured graph: tinyvllm's code, tinygrad's version and settings, the shape, the model's
    configuration and kernels, the devices, and the size and type of every named buffer (the logits buffers, which
    come and go with the graphs of their row count, follow from the shape)."""
    # tinygrad's settings as the environment sets them (its ContextVars are many more in a process that imports more
    # of tinygrad: a server's and a script's keys would differ)
    graphs = self.graphs
    settings = sorted((name, repr(var.value)) for name, var in ContextVar._cache.items() if name in os.environ)
    facts = (source_digest(), importlib.metadata.version("tinygrad"), settings, shape, graphs.model.config,
             graphs.model.kernels, graphs.paged, graphs.compile_options, graphs.devices,
             [(name, b.device, b.size, b.dtype) for name, b in names.items() if not name.startswith("logits")])
    return hashlib.sha256(repr(facts).encode()).hexdigest()
