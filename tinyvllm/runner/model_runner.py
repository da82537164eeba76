"""Turns a scheduled step into fixed-shape device buffers and runs it as two TinyJit graphs: the model, then the sampler.

TinyJit records the kernels of a function (here on its first call: everything a graph reads is realized before) and
afterwards replays them without Python, but only for the exact shapes it saw, and capturing a graph costs seconds
(on a 2-core CPU ~5-10 s for SmolLM2's 30 layers). A server cannot capture graphs while requests wait, so the
runner has a *bounded, known set of graphs*, all captured by `warmup` before the server says it is ready:

    a step's tokens, flattened:   [ decode A | decode B | chunk of C's prompt ........ | padding ]   T tokens
                                      │          │                       │
    their sequences' block tables:  row 0      row 1                   row 2      (R rows, `blocks` columns each)
    logits come out for:            A          B                       C (its chunk's last token)   R rows
    (a sequence checking k drafts brings k + 1 tokens and gets k + 1 rows: engine/speculative.py)

    model graphs     one per T in 1, 2, 4, ... bucket(max_num_batched_tokens) (8 left out on a GPU with tensor
                     cores), returning R logits rows: T rounded up to a power of four, at most max_num_seqs rounded
                     so; plus one at the largest T returning the logits of every position (prompt logprobs)
    sampler graphs   one per (R, plan) for those R and the three plans of `sampler.plans` (greedy, sampled,
                     general); plus the prompt-logprobs plan at the largest T

so for a CPU's defaults (max_num_seqs 64, max_num_batched_tokens 256) 10 model graphs and 13 sampler graphs. What
would otherwise multiply the count is kept out of the shapes:
- the context length: the block tables are a flat buffer, row r at r * blocks, and `blocks` (the step's longest
  context, in blocks) is a variable bound per step (`paged_attention.context_blocks`), so the attention kernels
  loop over the blocks in use and one graph serves every context length up to max_model_len;
- the mix of decodes and prompt chunks: every token of a step is one row of the same flat batch (each attends to
  its own sequence's context through `rows`, the table row of each token), so one graph runs the whole step and
  the weights are read once for all of it;
- the sampling parameters: per-row values travel as inputs, and only three plans exist (sampler.py).
Rows and tokens are padded up to their bucket (padding tokens write to the null block; padding rows sample
greedily and are dropped). `warmup` traces every graph first and compiles all of their kernels in one batch, then
captures each from its trace (a capture alone compiles its own graph's kernels, one graph after another).
`graph_builds` counts captures; one after `warmup` is logged, as it means a request waited for it. A captured graph is stored in tinygrad's cache db, and a later start with the same code, model
shapes and settings loads it instead of capturing it again (graph_store.py); `graph_loads` counts those.

A step is prepared (its inputs built on the host), launched (the inputs copied in, the graphs queued) and collected
(its output read back) in three calls, so that the engine can prepare the next step while the device runs this one
(engine/overlap.py: async scheduling). What a prepared step cannot know yet, the tokens the step before it is
sampling, is written into its inputs at launch.

Host <-> device copies go straight through the device's allocator (tinygrad_internals.py): tinygrad's own copies
schedule a graph on every call, which costs more Python per step than a small model's whole step takes on a GPU.
"""
from __future__ import annotations
import itertools
import logging
import time
from dataclasses import dataclass, field
import numpy as np
from tinygrad import Context, Tensor, TinyJit, dtypes
from tinygrad.device import Buffer, MultiBuffer
from tinyvllm.engine.block_manager import BlockManager, NULL_BLOCK
from tinyvllm.model.llama import ForwardBatch, LlamaForCausalLM
from tinyvllm.kernels.tensor_core import has_mma
from tinyvllm.kernels.paged_attention import BlockTables, context_blocks, new_pool
from tinyvllm.runner.sampler import (plans, SamplingPlan, bucket, penalized, plan_and_pack, prompt_logprobs, sample,
                                     unpack)
from tinyvllm.engine.scheduler import ScheduledSequence
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.speculative import AfterDrafts
from tinyvllm.engine.structured_output import mask_words
from tinyvllm.runner.graph_store import GraphStore
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


@dataclass
class Sampled:
  token: int
  logprob: float | None = None
  top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Group:
  """The rows of one model + sampler run: the graphs, their host inputs, and the decode rows whose token is still
  unknown."""
  rows: list[ScheduledSequence]
  model: _ModelGraph
  sampler: _SamplerGraph
  ints: np.ndarray                 # the model's int inputs, packed (tables last, only the columns in use)
  blocks: int                      # the step's context length in blocks: `context_blocks`' value
  sampler_ints: np.ndarray
  floats: np.ndarray
  unknown_tokens: list[tuple[int, Sequence]]    # (index in ints, sequence): the token the step before is sampling
  unknown_masks: list[tuple[int, Sequence]] = field(default_factory=list)   # (index in sampler_ints, sequence): the
                                                 # grammar's mask after that token (structured outputs)
  output: np.ndarray | None = None


@dataclass
class PreparedStep:
  """A scheduled step turned into graph inputs, not yet on the device."""
  scheduled: list[ScheduledSequence]
  groups: list[_Group]


@dataclass
class StepResult:
  sampled: dict[Sequence, list[Sampled]]   # of every sequence that reached its end: the next token, or with drafts,
                                           # the token sampled after the last known token and after each draft
  prompt_logprobs: dict[Sequence, list[dict[int, float]]]  # for prompt positions start+1.. of the chunk computed


def _aligned(n: int) -> int:
  """Sizes of inputs sharing a buffer are rounded to 16 int32s (64 bytes): a kernel may read each with vector loads."""
  return -(-max(n, 1) // 16) * 16


def _rows_bucket(n: int) -> int:
  """Rows of logits come in powers of four (1, 4, 16, 64, 256): a sampler graph per row count and plan costs seconds
  to capture, while a few extra rows of logits cost little."""
  return 1 << -(-(n - 1).bit_length() // 2) * 2


def _sampler_rows(s: ScheduledSequence) -> list[Sequence | AfterDrafts]:
  """The rows a scheduled sequence takes in the sampler: one, or one more per draft it checks."""
  return [s.seq] + [AfterDrafts(s.seq, i) for i in range(1, len(s.seq.draft_token_ids) + 1)] if s.samples else [s.seq]


def _starts(shape: ModelShape) -> list[int]:
  """Where a model graph's int inputs start in its buffer: tokens, positions, slots, rows, logits index, tables."""
  return list(itertools.accumulate((_aligned(n) for n in (shape.T,) * 4 + (shape.R,)), initial=0))


class _ModelGraph:
  """One captured forward pass for one ModelShape, reading its inputs from one persistent int buffer:
  tokens, positions, slots, rows [T] | logits index [R] | block tables [R * max_blocks], each 64-byte aligned."""
  def __init__(self, runner: ModelRunner, shape: ModelShape):
    self.shape, self.runner = shape, runner
    T, R = shape.T, shape.R
    self.starts = _starts(shape)
    self.table_start = self.starts[-1]
    buf = allocated((self.table_start + R * runner.max_blocks,), dtypes.int32, runner.devices)
    self.inputs = [buf[start:start + n] for start, n in zip(self.starts, (T, T, T, T, R))]
    self.tables = buf[self.table_start:]
    self.buffer = buf.uop.buffer
    # BEAM searches the graphs of decode-sized steps only: they replay every step, while the long prompt-chunk
    # steps are rarer and their search would take minutes on a GPU
    self.compile_options = runner.compile_options if T <= runner.max_rows else {}
    runner.logits(R)
    self.jit = TinyJit(self._forward)
    # captured on the first call, not the second: the weights, pools and inputs are all realized before it, so the
    # plain run TinyJit makes first would only trace and compile the graph once more
    self.jit.cnt = 1

  def own_buffers(self) -> dict[str, Buffer | MultiBuffer]: return {"inputs": self.buffer}

  def _forward(self, blocks: Tensor) -> Tensor:
    tokens, positions, slots, rows, logits_index = self.inputs
    runner, devices = self.runner, self.runner.devices
    blocks_var = Tensor.full((1,), blocks, dtype=dtypes.int32, device=devices[0])
    if len(devices) > 1: blocks_var = blocks_var.shard(devices)
    tables = BlockTables(self.tables, rows, blocks_var, runner.block_size, runner.max_blocks)
    batch = ForwardBatch(tokens, positions, slots, tables, logits_index, runner.paged)
    logits = runner.model(batch, runner.kv_cache, every_position=self.shape.every)
    # into the buffer the sampler graphs of this row count read, on the first device (from every device, under
    # tensor parallelism)
    return runner.logits(self.shape.R).assign(logits.to(devices[0])).realize()

  def trace(self) -> Tensor: return self._forward(context_blocks(self.runner.max_blocks).bind(1))

  def launch(self, ints: np.ndarray, blocks: int) -> None:
    """Fill the inputs (the tables' columns in use only) and queue the graph, which writes its logits into
    `runner.logits(R)`."""
    upload(self.buffer, ints)
    with Context(**self.compile_options): self.jit(context_blocks(self.runner.max_blocks).bind(blocks))


class _SamplerGraph:
  """One captured sampler for one SamplerShape: reads the logits the model graphs of its row count write, and its
  own inputs, ints (adjusted token ids | last position, next prompt tokens) and floats (per-row parameters). None is
  an argument of the graph: arguments cost a parameter update of every kernel that reads them at each replay."""
  def __init__(self, runner: ModelRunner, shape: SamplerShape, num_floats: int):
    self.shape, self.runner = shape, runner
    device = runner.devices[0]
    plan = shape.plan        # adjusted ids and masks per row, then for prompt logprobs the last position and targets
    num_ints = shape.R * (plan.num_adjusted + plan.mask_words) + (0 if plan.num_prompt_logprobs is None else 1 + shape.T)
    self.ints = allocated((_aligned(num_ints),), dtypes.int32, device)
    self.floats = allocated((num_floats,), dtypes.float32, device)
    runner.logits(shape.T or shape.R)
    self.jit = TinyJit(self._sample)
    self.jit.cnt = 1
    self.output: Buffer | None = None

  def own_buffers(self) -> dict[str, Buffer | MultiBuffer]:
    return {"ints": self.ints.uop.buffer, "floats": self.floats.uop.buffer}

  def _sample(self) -> Tensor:
    R, plan = self.shape.R, self.shape.plan
    logits = self.runner.logits(self.shape.T or R)
    U = R * (plan.num_adjusted + plan.mask_words)
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


class ModelRunner:
  def __init__(self, model: LlamaForCausalLM, devices: tuple[str, ...], num_blocks: int, block_size: int, kv_dtype,
               stop_ids: set[int], max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
               seed: int = 0, beam: int = 0, paged: bool = True):
    """`devices`: the model's, more than one when tensor parallelism splits it; the KV pool is then split by KV head
    the same way, and the host's inputs and outputs stay on the first device. `beam`: tinygrad's kernel search width
    for the decode-sized graphs' kernels (0: tinygrad's own setting, its BEAM variable, off by default). `paged`:
    tokens attend straight from the pool (kernels/paged_attention.py) rather than from a dense copy of their context."""
    cfg = model.config
    self.model, self.block_size, self.seed, self.stop_ids, self.devices = model, block_size, seed, stop_ids, devices
    self.paged, self.vocab_size = paged, cfg.vocab_size
    self.compile_options = {"BEAM": beam} if beam else {}
    self.max_blocks = -(-max_model_len // block_size)
    self.max_rows, self.max_tokens = _rows_bucket(max_num_seqs), bucket(max_num_batched_tokens)
    # On a GPU with tensor cores, 5-15 rows fall between the few-row kernel (≤ 4 rows, kernels/matvec.py) and the
    # tensor-core one (16 rows and up): tinygrad's generic matmul took an H100 19.2 ms for a Llama-1B step of 8
    # tokens, against 2.2 ms for 16, so a step of 5-8 tokens runs in the 16-token graph.
    self.min_tiled_tokens = 16 if len(devices) == 1 and has_mma(devices[0], kv_dtype) else 0
    self.max_adjusted = bucket(min(cfg.vocab_size, 2 * max_model_len), 16)
    self.mask_words = mask_words(cfg.vocab_size)         # structured outputs' allowed-token bitmask, per row
    self.kv_cache = [tuple(new_pool(num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype, devices)
                           for _ in range(2)) for _ in range(cfg.num_layers)]
    Tensor.realize(*(pool for pools in self.kv_cache for pool in pools))
    self.logits_buffers: dict[int, Tensor] = {}
    self.models: dict[ModelShape, _ModelGraph] = {}
    self.samplers: dict[SamplerShape, _SamplerGraph] = {}
    self.graph_builds, self.graph_loads, self.graph_build_seconds, self.ready = 0, 0, 0.0, False
    self.kernels_compiled = 0         # by `warmup` before its captures, all in one batch
    self.store = GraphStore(self)

  def logits(self, rows: int) -> Tensor:
    """The [rows, vocab] float32 buffer on the first device that model graphs of `rows` logits rows write and
    sampler graphs read."""
    if rows not in self.logits_buffers:
      self.logits_buffers[rows] = allocated((rows, self.vocab_size), dtypes.float32, self.devices[0])
    return self.logits_buffers[rows]

  # ---- the bounded set of shapes -------------------------------------------------------------------------------
  def model_shape(self, num_tokens: int, every: bool = False) -> ModelShape:
    if every: return ModelShape(self.max_tokens, self.max_tokens, True)
    T = bucket(num_tokens)
    if 4 < T < self.min_tiled_tokens: T = min(self.min_tiled_tokens, self.max_tokens)
    return ModelShape(T, min(_rows_bucket(T), self.max_rows))

  def graph_set(self) -> tuple[list[ModelShape], list[SamplerShape]]:
    """Every shape a step can take: what `warmup` captures."""
    sizes = lambda top: [1 << i for i in range(top.bit_length())]
    models = list(dict.fromkeys(self.model_shape(T) for T in sizes(self.max_tokens))) + [self.model_shape(0, every=True)]
    samplers = [SamplerShape(R, plan) for R in sorted({shape.R for shape in models if not shape.every})
                for plan in plans(self.max_adjusted, mask_words=self.mask_words)]
    samplers += [SamplerShape(1, plans(self.max_adjusted, True, self.mask_words)[-1], self.max_tokens)]
    return models, samplers

  def _model(self, shape: ModelShape) -> _ModelGraph:
    if shape not in self.models: self.models[shape] = self._built(lambda: _ModelGraph(self, shape), shape)
    return self.models[shape]

  def _sampler(self, shape: SamplerShape, num_floats: int) -> _SamplerGraph:
    if shape not in self.samplers:
      self.samplers[shape] = self._built(lambda: _SamplerGraph(self, shape, num_floats), shape)
    return self.samplers[shape]

  def _built(self, make, shape):
    graph = make()
    if self.store.load(shape, graph):                  # an earlier process with this code and shape captured it
      self.graph_loads += 1
      return graph
    self.graph_builds += 1
    if self.ready: log.warning("graph built after warmup, on the request path: %s", shape)
    return graph

  # ---- a step --------------------------------------------------------------------------------------------------
  def prepare(self, scheduled: list[ScheduledSequence], block_manager: BlockManager) -> PreparedStep:
    """The inputs of the forward passes that compute the scheduled tokens' K/V and sample the next token of every
    sequence whose tokens are then all computed: all rows in one flat batch, except a sequence that asked for
    prompt logprobs, which runs alone (its every position's logits come back). Needs no token of the step before:
    those are filled in by `launch`."""
    plain = [s for s in scheduled if not s.seq.wants_prompt_logprobs]
    groups = [[s] for s in scheduled if s.seq.wants_prompt_logprobs]
    if plain: groups.insert(0, plain)
    return PreparedStep(scheduled, [self._prepare_group(group, block_manager) for group in groups])

  @staticmethod
  def can_run_ahead(step: PreparedStep) -> bool:
    """Whether the next step may be prepared before this one's tokens reach the host: no sampler may need them
    before `launch` (penalties count the tokens generated), no prompt logprobs may still be on their way, and no
    drafts are being checked (how many are accepted sets the next step's positions)."""
    return not any(s.samples and (penalized(s.seq.params) or s.seq.wants_prompt_logprobs or s.seq.draft_token_ids)
                   for s in step.scheduled)

  def launch(self, step: PreparedStep, before: StepResult | None = None) -> PreparedStep:
    """Queue the step's graphs on the device, with the tokens `before` sampled for its decode rows; returns while
    the device computes the last of them (the others are read back at once: two groups of one shape replay the
    same graphs, whose output buffers the second replay overwrites)."""
    for i, group in enumerate(step.groups):
      for index, seq in group.unknown_tokens: group.ints[index] = before.sampled[seq][-1].token
      for index, seq in group.unknown_masks:
        mask = seq.matcher.allowed_after([before.sampled[seq][-1].token])
        group.sampler_ints[index:index + len(mask)] = mask
      group.model.launch(group.ints, group.blocks)
      group.sampler.launch(group.sampler_ints, group.floats)
      if i < len(step.groups) - 1: group.output = group.sampler.read()
    return step

  def collect(self, step: PreparedStep) -> StepResult:
    """Wait for a launched step; its sampled tokens (and prompt logprobs) on the host."""
    result = StepResult({}, {})
    for group in step.groups:
      out, shape = group.sampler.read() if group.output is None else group.output, group.sampler.shape
      width = shape.plan.output_width
      sampled, prompt = out[:shape.R * width].reshape(shape.R, -1).tolist(), out[shape.R * width:]
      row = 0
      for s in group.rows:
        n = 1 + len(s.seq.draft_token_ids) if s.samples else 1      # its rows: `_sampler_rows`
        if s.samples: result.sampled[s.seq] = [self._sampled(sampled[i], shape.plan) for i in range(row, row + n)]
        row += n
        if shape.plan.num_prompt_logprobs is not None:       # a group of its own that asked for them
          result.prompt_logprobs[s.seq] = self._prompt_logprobs(s, prompt, shape.plan)
    return result

  def _prepare_group(self, group: list[ScheduledSequence], bm: BlockManager) -> _Group:
    every = group[0].seq.wants_prompt_logprobs
    shape = self.model_shape(sum(s.num_new_tokens for s in group), every)
    ints, blocks, unknown = self._model_inputs(group, shape, bm)
    # a sampler row per sequence, and one more per draft it checks: the sequence as if the drafts before it held
    rows: list[Sequence | AfterDrafts | None] = [row for s in group for row in _sampler_rows(s)]
    R = 1 if every else shape.R
    plan, adjusted_ids, floats = plan_and_pack(rows + [None] * (R - len(rows)), self.seed, self.stop_ids,
                                               self.max_adjusted, mask_words=self.mask_words)
    sampler_shape = SamplerShape(R, plan, shape.T if every else 0)
    sampler_ints = adjusted_ids if not every else \
      np.concatenate([adjusted_ids, [group[0].num_new_tokens - 1], self._next_prompt_tokens(group[0], shape.T)])
    sampler = self._sampler(sampler_shape, floats.size)
    # a grammar's row whose last token is still being sampled: its mask is computed at launch (plan_and_pack left
    # every token allowed there)
    masks_at = R * plan.num_adjusted
    unknown_masks = [(masks_at + row * plan.mask_words, seq) for row, seq in enumerate(rows)
                     if isinstance(seq, Sequence) and seq.matcher and seq.num_pending_tokens]
    return _Group(group, self._model(shape), sampler, ints, blocks, sampler_ints.astype(np.int32), floats, unknown,
                  unknown_masks)

  def _model_inputs(self, group: list[ScheduledSequence], shape: ModelShape, bm: BlockManager) \
      -> tuple[np.ndarray, int, list[tuple[int, Sequence]]]:
    """tokens, positions, slots, rows [T] | logits index [R] | block tables [R, blocks], packed as the graph's
    buffer lays them out; the tables' width `blocks`; where the decode rows' still unknown tokens go. Built as
    Python lists and turned into an array once: a numpy assignment per row and field costs ~1 ms a step at
    batch 256."""
    T, R, bs = shape.T, shape.R, self.block_size
    blocks = max(-(-(s.start + s.num_new_tokens) // bs) for s in group)
    null_slot = NULL_BLOCK * bs
    tokens, positions, slots, rows, logits_index, tables, unknown = [], [], [], [], [], [], []
    for row, s in enumerate(group):
      seq, n, start = s.seq, s.num_new_tokens, s.start
      # a decode row's token is unknown while the step before is sampling it: filled in at launch
      if start == seq.num_known_tokens: unknown.append((len(tokens), seq))
      new = seq.tokens(start, n)
      tokens += new + [0] * (n - len(new))
      positions += range(start, start + n)
      slots += [bm.slot(seq, p) for p in range(start, start + n)]
      rows += [row] * n
      checked = len(seq.draft_token_ids) if s.samples else 0     # drafts: logits of each, and of the token before
      logits_index += range(len(tokens) - 1 - checked, len(tokens))
      tables += seq.block_table + [NULL_BLOCK] * (blocks - len(seq.block_table))
    pad = T - len(tokens)                     # padding tokens: token 0 at the null block's slot, row 0's table
    fields = [tokens + [0] * pad, positions + [0] * pad, slots + [null_slot] * pad, rows + [0] * pad,
              logits_index + [0] * (R - len(logits_index))]
    starts = _starts(shape)
    out = np.zeros(starts[-1], np.int32)
    for start, values in zip(starts, fields): out[start:start + len(values)] = values
    return np.concatenate([out, np.array(tables, np.int32)]), blocks, unknown

  @staticmethod
  def _sampled(row: list[float], plan: SamplingPlan) -> Sampled:
    if not plan.want_logprobs: return Sampled(int(row[0]))
    K = plan.num_logprobs
    return Sampled(int(row[0]), float(row[1]), [(int(i), float(lp)) for i, lp in zip(row[2:2 + K], row[2 + K:])])

  @staticmethod
  def _prompt_logprobs(s: ScheduledSequence, out: np.ndarray, plan: SamplingPlan) -> list[dict[int, float]]:
    """{next prompt token: logprob, top ids: logprobs} for each computed position that predicts a prompt token."""
    seq, P = s.seq, plan.num_prompt_logprobs
    n = min(s.num_new_tokens, len(seq.prompt_token_ids) - 1 - s.start)
    rows = out.reshape(-1, plan.prompt_output_width)[:n]
    targets = seq.prompt_token_ids[s.start + 1:][:n]
    top = seq.params.prompt_logprobs
    return [{t: float(r[0]), **{int(i): float(lp) for i, lp in zip(r[1:1 + top], r[1 + P:1 + P + top])}}
            for t, r in zip(targets, rows)]

  @staticmethod
  def _next_prompt_tokens(s: ScheduledSequence, T: int) -> np.ndarray:
    """For prompt logprobs: the prompt token that follows each computed position (0 past the prompt)."""
    targets = np.zeros(T, np.int32)
    following = s.seq.prompt_token_ids[s.start + 1:][:s.num_new_tokens]
    targets[:len(following)] = following
    return targets

  def warmup(self) -> tuple[int, float]:
    """Capture every graph of `graph_set` (a no-op for those already captured), each run once on padding inputs;
    from then on a capture is logged as a warning. Returns (graphs built, seconds)."""
    t0, before = time.perf_counter(), self.graph_builds
    models, samplers = self.graph_set()
    model_runs = []
    for shape in models:
      graph = self._model(shape)
      ints = np.zeros(graph.table_start + shape.R, np.int32)
      ints[graph.starts[2]:graph.starts[2] + shape.T] = NULL_BLOCK * self.block_size       # slots
      ints[graph.table_start:] = NULL_BLOCK
      model_runs.append((graph, ints))
    sampler_runs = []
    for shape in samplers:
      _, ids, floats = plan_and_pack([None] * shape.R, self.seed, self.stop_ids, self.max_adjusted, shape.plan)
      extra = [] if shape.plan.num_prompt_logprobs is None else [0] * (1 + shape.T)
      ints = np.concatenate([ids, np.array(extra, np.int32)]).astype(np.int32)
      sampler_runs.append((self._sampler(shape, floats.size), ints, floats))
    # every graph still to capture traced first and its kernels compiled in one batch (a capture would compile only
    # its own graph's, waiting for the slowest), then captured from its trace
    uncaptured = [graph for graph, *_ in model_runs + sampler_runs
                  if graph.jit.captured is None and not getattr(graph, "compile_options", None)]   # BEAM: in the capture
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
    self.graph_build_seconds += seconds
    return self.graph_builds - before, seconds
