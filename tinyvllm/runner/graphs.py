"""The bounded set of TinyJit graphs a model runner replays, all captured (or loaded) before a server is ready.

TinyJit records the kernels of a function (here on its first call: everything a graph reads is realized before) and
afterwards replays them without Python, but only for the exact shapes it saw, and capturing a graph costs seconds
(on a 2-core CPU ~5-10 s for SmolLM2's 30 layers). A server cannot capture graphs while requests wait, so the
runner has a *bounded, known set of graphs*, all captured by `warmup` before the server says it is ready:

    model graphs     one per T in 1, 2, 4, ... bucket(max_num_batched_tokens) (8 left out on a GPU with tensor
                     cores), returning R logits rows: T rounded up to a power of four, at most max_num_seqs rounded
                     so; plus one at the largest T returning the logits of every position (prompt logprobs)
    sampler graphs   one per (R, plan) for those R and the three plans of `sampler.plans` (greedy, sampled,
                     general); plus the prompt-logprobs plan at the largest T

so for a CPU's defaults (max_num_seqs 64, max_num_batched_tokens 256) 10 model graphs and 13 sampler graphs. A
diffusion LM's engine (engine/denoising.py) samples a row per position of its sequences' blocks, so its model graphs
return R = T rows, its sampler graphs have one plan (`sampler.SCORED`), and neither has a prompt-logprobs graph. The
count stays that small because the context length, the mix of decodes and prompt chunks and the sampling parameters
are inputs, not shapes (model_runner.py).

Rows and tokens are padded up to their bucket (padding tokens write to the null block; padding rows sample
greedily and are dropped). `warmup` traces every graph first and compiles all of their kernels in one batch, then
captures each from its trace (a capture alone compiles its own graph's kernels, one graph after another). `builds`
counts captures; one after `warmup` is logged, as it means a request waited for it. A captured graph is stored in
tinygrad's cache db, and a later start with the same code, model shapes and settings loads it instead of capturing
it again (graph_store.py); `loads` counts those.
"""
from __future__ import annotations
import itertools
import logging
import time
from dataclasses import dataclass
import numpy as np
from tinygrad import Context, Tensor, TinyJit, dtypes
from tinygrad.device import Buffer, MultiBuffer
from tinyvllm.engine.block_manager import NULL_BLOCK
from tinyvllm.engine.structured_output import mask_words
from tinyvllm.kernels.paged_attention import BlockTables, context_blocks
from tinyvllm.kernels.tensor_core import has_mma
from tinyvllm.model.llama import ForwardBatch, LlamaForCausalLM
from tinyvllm.runner.graph_store import GraphStore
from tinyvllm.runner.sampler import SCORED, SamplingPlan, bucket, plan_and_pack, plans, prompt_logprobs, sample, unpack
from tinyvllm.tinygrad_internals import allocated, download, trace_and_compile, upload

log = logging.getLogger("tinyvllm.runner")


@dataclass(frozen=True)
class ModelShape:
  T: int                 # tokens computed
  R: int                 # rows of logits returned (T when every position's are)
  every: bool = False    # the logits of every position, for prompt logprobs


@dataclass(frozen=True)
class SamplerShape:
  R: int                 # rows sampled (for prompt logprobs: 1, from a model graph of T logits rows)
  plan: SamplingPlan
  T: int = 0             # prompt logprobs: the positions whose logprobs come back


def aligned(n: int) -> int:
  """Sizes of inputs sharing a buffer are rounded to 16 int32s (64 bytes): a kernel may read each with vector loads."""
  return -(-max(n, 1) // 16) * 16


def rows_bucket(n: int) -> int:
  """Rows of logits come in powers of four (1, 4, 16, 64, 256): a sampler graph per row count and plan costs seconds
  to capture, while a few extra rows of logits cost little."""
  return 1 << -(-(n - 1).bit_length() // 2) * 2


def input_starts(shape: ModelShape) -> list[int]:
  """Where a model graph's int inputs start in its buffer: tokens, positions, slots, rows, key limits, logits index,
  tables."""
  return list(itertools.accumulate((aligned(n) for n in (shape.T,) * 5 + (shape.R,)), initial=0))


class ModelGraph:
  """One captured forward pass for one ModelShape, reading its inputs from one persistent int buffer:
  tokens, positions, slots, rows, key limits [T] | logits index [R] | block tables [R * max_blocks], each 64-byte
  aligned."""
  def __init__(self, graphs: Graphs, shape: ModelShape):
    self.shape, self.graphs = shape, graphs
    T, R = shape.T, shape.R
    self.starts = input_starts(shape)
    self.table_start = self.starts[-1]
    buf = allocated((self.table_start + R * graphs.max_blocks,), dtypes.int32, graphs.devices)
    self.inputs = [buf[start:start + n] for start, n in zip(self.starts, (T, T, T, T, T, R))]
    self.tables = buf[self.table_start:]
    self.buffer = buf.uop.buffer
    # BEAM searches the graphs of decode-sized steps only: they replay every step, while the long prompt-chunk
    # steps are rarer and their search would take minutes on a GPU
    self.compile_options = graphs.compile_options if T <= graphs.max_rows else {}
    graphs.logits(R)
    self.jit = TinyJit(self._forward)
    # captured on the first call, not the second: the weights, pools and inputs are all realized before it, so the
    # plain run TinyJit makes first would only trace and compile the graph once more
    self.jit.cnt = 1

  def own_buffers(self) -> dict[str, Buffer | MultiBuffer]: return {"inputs": self.buffer}

  def _forward(self, blocks: Tensor) -> Tensor:
    tokens, positions, slots, rows, key_limits, logits_index = self.inputs
    graphs, devices = self.graphs, self.graphs.devices
    blocks_var = Tensor.full((1,), blocks, dtype=dtypes.int32, device=devices[0])
    if len(devices) > 1: blocks_var = blocks_var.shard(devices)
    tables = BlockTables(self.tables, rows, blocks_var, graphs.block_size, graphs.max_blocks)
    batch = ForwardBatch(tokens, positions, slots, tables, logits_index, graphs.paged, key_limits)
    logits = graphs.model(batch, graphs.kv_cache, every_position=self.shape.every)
    # into the buffer the sampler graphs of this row count read, on the first device (from every device, under
    # tensor parallelism)
    return graphs.logits(self.shape.R).assign(logits.to(devices[0])).realize()

  def trace(self) -> Tensor: return self._forward(context_blocks(self.graphs.max_blocks).bind(1))

  def launch(self, ints: np.ndarray, blocks: int) -> None:
    """Fill the inputs (the tables' columns in use only) and queue the graph, which writes its logits into
    `Graphs.logits(R)`."""
    upload(self.buffer, ints)
    with Context(**self.compile_options): self.jit(context_blocks(self.graphs.max_blocks).bind(blocks))


class SamplerGraph:
  """One captured sampler for one SamplerShape: reads the logits the model graphs of its row count write, and its
  own inputs, ints (adjusted token ids | last position, next prompt tokens) and floats (per-row parameters). None is
  an argument of the graph: arguments cost a parameter update of every kernel that reads them at each replay."""
  def __init__(self, graphs: Graphs, shape: SamplerShape, num_floats: int):
    self.shape, self.graphs = shape, graphs
    device = graphs.devices[0]
    plan = shape.plan        # adjusted ids and masks per row, then for prompt logprobs the last position and targets
    num_ints = shape.R * (plan.num_adjusted + plan.mask_words + plan.guided) + \
      (0 if plan.num_prompt_logprobs is None else 1 + shape.T)
    self.ints = allocated((aligned(num_ints),), dtypes.int32, device)
    self.floats = allocated((num_floats,), dtypes.float32, device)
    self.compile_options: dict = {}          # BEAM searches the model graphs only
    graphs.logits(shape.T or shape.R)
    self.jit = TinyJit(self._sample)
    self.jit.cnt = 1
    self.output: Buffer | None = None

  def own_buffers(self) -> dict[str, Buffer | MultiBuffer]:
    return {"ints": self.ints.uop.buffer, "floats": self.floats.uop.buffer}

  def _sample(self) -> Tensor:
    R, plan = self.shape.R, self.shape.plan
    logits = self.graphs.logits(self.shape.T or R)
    U = R * (plan.num_adjusted + plan.mask_words + plan.guided)
    params = unpack(self.ints[:max(U, 1)], self.floats, R, plan)
    if plan.num_prompt_logprobs is None: return sample(logits, params, plan).flatten().contiguous().realize()
    T, V = self.shape.T, logits.shape[1]
    last, next_tokens = self.ints[U:U + 1], self.ints[U + 1:U + 1 + T]
    row = logits.gather(0, last.reshape(1, 1).expand(1, V))
    prompt = prompt_logprobs(logits, next_tokens, params["temperature"], plan.num_prompt_logprobs)
    return sample(row, params, plan).flatten().cat(prompt.flatten()).contiguous().realize()

  def trace(self) -> Tensor: return self._sample()

  def launch(self, ints: np.ndarray, floats: np.ndarray) -> None:
    # the forward pass queued before it does not read these, and the last launch of this graph has been read back:
    # no need to wait for the device (a CPU's copy would wait for the forward pass)
    upload(self.ints.uop.buffer, ints, wait=False)
    upload(self.floats.uop.buffer, floats, wait=False)
    out = self.jit()
    if self.output is None: self.output = out.uop.buffer

  def read(self) -> np.ndarray:
    """The last launch's output: waits for the device."""
    return download(self.output)


class Graphs:
  def __init__(self, model: LlamaForCausalLM, devices: tuple[str, ...], kv_cache: list, block_size: int, kv_dtype,
               max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int, seed: int, stop_ids: set[int],
               beam: int = 0, paged: bool = True, rows_per_seq: int = 1):
    """The graphs of `model` reading and writing `kv_cache`. `beam`: tinygrad's kernel search width for the
    decode-sized graphs' kernels (0: tinygrad's own setting, its BEAM variable, off by default). `paged`: tokens
    attend straight from the pool (kernels/paged_attention.py) rather than from a dense copy of their context.
    `rows_per_seq`: the most logits rows one sequence samples in a step (a diffusion LM's longest block)."""
    cfg = model.config
    self.model, self.devices, self.kv_cache, self.block_size, self.paged = model, devices, kv_cache, block_size, paged
    self.seed, self.stop_ids, self.vocab_size = seed, stop_ids, cfg.vocab_size     # warm-up's sampler inputs
    self.compile_options = {"BEAM": beam} if beam else {}
    self.max_blocks = -(-max_model_len // block_size)
    self.max_rows, self.max_tokens = rows_bucket(max_num_seqs), bucket(max_num_batched_tokens)
    # On a GPU with tensor cores, 5-15 rows fall between the few-row kernel (≤ 4 rows, kernels/matvec.py) and the
    # tensor-core one (16 rows and up): tinygrad's generic matmul took an H100 19.2 ms for a Llama-1B step of 8
    # tokens, against 2.2 ms for 16, so a step of 5-8 tokens runs in the 16-token graph.
    self.min_tiled_tokens = 16 if len(devices) == 1 and has_mma(devices[0], kv_dtype) else 0
    self.max_adjusted = bucket(min(cfg.vocab_size, 2 * max_model_len), 16)
    # a diffusion LM's step samples a row per block position (engine/denoising.py), with one plan
    self.diffusion = cfg.mask_token_id is not None
    self.max_block_rows = bucket(max_num_seqs * rows_per_seq)      # every token of a step may be a block position
    self.mask_words = mask_words(cfg.vocab_size)         # structured outputs' allowed-token bitmask, per row
    self.logits_buffers: dict[int, Tensor] = {}
    self.models: dict[ModelShape, ModelGraph] = {}
    self.samplers: dict[SamplerShape, SamplerGraph] = {}
    self.builds, self.loads, self.build_seconds, self.ready = 0, 0, 0.0, False
    self.kernels_compiled = 0         # by `warmup` before its captures, all in one batch
    self.store = GraphStore(self)

  def logits(self, rows: int) -> Tensor:
    """The [rows, vocab] float32 buffer on the first device that model graphs of `rows` logits rows write and
    sampler graphs read."""
    if rows not in self.logits_buffers:
      self.logits_buffers[rows] = allocated((rows, self.vocab_size), dtypes.float32, self.devices[0])
    return self.logits_buffers[rows]

  def model_shape(self, num_tokens: int, every: bool = False) -> ModelShape:
    if every: return ModelShape(self.max_tokens, self.max_tokens, True)
    T = bucket(num_tokens)
    if 4 < T < self.min_tiled_tokens: T = min(self.min_tiled_tokens, self.max_tokens)
    return ModelShape(T, min(T, self.max_block_rows) if self.diffusion else min(rows_bucket(T), self.max_rows))

  def graph_set(self) -> tuple[list[ModelShape], list[SamplerShape]]:
    """Every shape a step can take: what `warmup` captures."""
    sizes = lambda top: [1 << i for i in range(top.bit_length())]
    models = list(dict.fromkeys(self.model_shape(T) for T in sizes(self.max_tokens)))
    if not self.diffusion: models.append(self.model_shape(0, every=True))     # prompt logprobs (autoregressive only)
    plan_set = [SCORED] if self.diffusion else plans(self.max_adjusted, mask_words=self.mask_words)
    samplers = [SamplerShape(R, plan) for R in sorted({shape.R for shape in models if not shape.every})
                for plan in plan_set]
    if not self.diffusion:
      samplers += [SamplerShape(1, plans(self.max_adjusted, True, self.mask_words)[-1], self.max_tokens)]
    return models, samplers

  def model_graph(self, shape: ModelShape) -> ModelGraph:
    if shape not in self.models: self.models[shape] = self._built(lambda: ModelGraph(self, shape), shape)
    return self.models[shape]

  def sampler_graph(self, shape: SamplerShape, num_floats: int) -> SamplerGraph:
    if shape not in self.samplers:
      self.samplers[shape] = self._built(lambda: SamplerGraph(self, shape, num_floats), shape)
    return self.samplers[shape]

  def _built(self, make, shape):
    graph = make()
    if self.store.load(shape, graph):                  # an earlier process with this code and shape captured it
      self.loads += 1
      return graph
    self.builds += 1
    if self.ready: log.warning("graph built after warmup, on the request path: %s", shape)
    return graph

  def warmup(self) -> tuple[int, float]:
    """Capture every graph of `graph_set` (a no-op for those already captured), each run once on padding inputs;
    from then on a capture is logged as a warning. Returns (graphs built, seconds)."""
    t0, before = time.perf_counter(), self.builds
    models, samplers = self.graph_set()
    model_runs = []
    for shape in models:
      graph = self.model_graph(shape)
      ints = np.zeros(graph.table_start + shape.R, np.int32)
      ints[graph.starts[2]:graph.starts[2] + shape.T] = NULL_BLOCK * self.block_size       # slots
      ints[graph.table_start:] = NULL_BLOCK
      model_runs.append((graph, ints))
    sampler_runs = []
    for shape in samplers:
      _, ids, floats = plan_and_pack([None] * shape.R, self.seed, self.stop_ids, self.max_adjusted, shape.plan)
      extra = [] if shape.plan.num_prompt_logprobs is None else [0] * (1 + shape.T)
      ints = np.concatenate([ids, np.array(extra, np.int32)]).astype(np.int32)
      sampler_runs.append((self.sampler_graph(shape, floats.size), ints, floats))
    # every graph still to capture traced first and its kernels compiled in one batch (a capture would compile only
    # its own graph's, waiting for the slowest), then captured from its trace
    uncaptured = [graph for graph, *_ in model_runs + sampler_runs     # (a BEAM search compiles in the capture)
                  if graph.jit.captured is None and not graph.compile_options]
    traces, compiled = trace_and_compile([graph.trace for graph in uncaptured])
    self.kernels_compiled += compiled
    functions = [graph.jit.fxn for graph in uncaptured]
    for graph, traced in zip(uncaptured, traces): graph.jit.fxn = traced.replay
    for graph, ints in model_runs: graph.launch(ints, 1)
    for graph, ints, floats in sampler_runs:
      graph.launch(ints, floats)
      graph.read()
    for graph, fxn in zip(uncaptured, functions): graph.jit.fxn = fxn     # captured: the traces are done with
    self.store.store_captured()
    self.ready = True
    seconds = time.perf_counter() - t0
    self.build_seconds += seconds
    return self.builds - before, seconds
