"""Turns a scheduled step into fixed-shape device buffers and runs the model + sampler as one TinyJit graph.

TinyJit records the kernels of a function (here on its first call: everything a graph reads is realized before) and
afterwards replays them without Python, but only for the exact shapes it saw. A step's shape changes all the time
(how many sequences, how many tokens each, how long their contexts are), so every shape is rounded up to a *bucket*:

    S  sequences            → next power of two                 (padding rows: greedy, write to the null block)
    Q  query tokens per row → 1 for decodes; prefill chunks → next power of two ≥ 16
    NB block-table columns  → next power of two ≥ 4              (padding columns point at the null block)

and each (S, Q, NB, sampling plan) gets its own captured graph, compiled once. A step runs one graph for all the
decoding rows (Q = 1, the common case) and one for the prefill chunks of each Q bucket (chunks of similar length
share a graph, so the weights are read once for all of them, and a short prompt is never padded to a long one's
length). Each graph owns its input buffers (tokens, positions, slots, ... as slices of three buffers), allocated
when it is first used, refilled in place every step and read by the graph like its weights. A sequence that asked
for prompt logprobs runs its prompt alone, in graphs that also return the logprobs of every position.

A step is prepared (its inputs built on the host), launched (the inputs copied in, the graphs queued) and collected
(its output read back) in three calls, so that the engine can prepare the next step while the device runs this one
(engine.py: async scheduling). What a prepared step cannot know yet, the tokens the step before it is sampling, is
written into its inputs at launch.

Host <-> device copies go straight through the device's allocator (transfer.py): tinygrad's own copies schedule a
graph on every call, which costs more Python per step than a small model's whole step takes on a GPU.
"""
from __future__ import annotations
import itertools
import time
from dataclasses import dataclass
import numpy as np
from tinygrad import Context, Tensor, TinyJit, dtypes
from tinygrad.device import Buffer
from tinyvllm.block_manager import BlockManager, NULL_BLOCK
from tinyvllm.model.llama import ForwardBatch, LlamaForCausalLM
from tinyvllm.model.paged_attention import new_pool
from tinyvllm.sampler import SamplingPlan, bucket, penalized, plan_and_pack, prompt_logprobs, sample, unpack
from tinyvllm.scheduler import ScheduledSequence
from tinyvllm.sequence import Sequence
from tinyvllm.transfer import allocated, download, upload


@dataclass(frozen=True)
class Shape:
  S: int
  Q: int
  NB: int
  plan: SamplingPlan

  @property
  def int_sizes(self) -> tuple[int, ...]:
    # tokens, positions, slot_mapping, block_tables, logits_index, sampler's, next prompt tokens (prompt logprobs)
    SQ = self.S * self.Q
    return (SQ, SQ, SQ, self.S * self.NB, self.S, self.S * self.plan.num_adjusted,
            SQ if self.plan.num_prompt_logprobs is not None else 0)


@dataclass
class Sampled:
  token: int
  logprob: float | None = None
  top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Group:
  """The rows of one graph's run: the graph, its host inputs, and the decode rows whose token is still unknown."""
  rows: list[ScheduledSequence]
  graph: _Graph
  ints: np.ndarray
  floats: np.ndarray
  unknown_tokens: list[tuple[int, Sequence]]    # (index in ints, sequence): the token the step before is sampling
  output: np.ndarray | None = None


@dataclass
class PreparedStep:
  """A scheduled step turned into graph inputs, not yet on the device."""
  scheduled: list[ScheduledSequence]
  groups: list[_Group]


@dataclass
class StepResult:
  sampled: dict[Sequence, Sampled]                       # the next token of every sequence that reached its end
  prompt_logprobs: dict[Sequence, list[dict[int, float]]]  # for prompt positions start+1.. of the chunk computed


class _Layout:
  """Where inputs of `sizes` int32s sit in one buffer: each at a multiple of 16 (64 bytes), an empty one given 1."""
  ALIGN = 16
  def __init__(self, sizes: tuple[int, ...]):
    self.sizes = sizes
    slots = [-(-max(n, 1) // self.ALIGN) * self.ALIGN for n in sizes]
    self.starts, self.total = [sum(slots[:i]) for i in range(len(slots))], sum(slots)
    self._positions = np.concatenate([np.arange(start, start + n) for start, n in zip(self.starts, sizes)])

  def pack(self, ints: np.ndarray) -> np.ndarray:
    """The inputs, concatenated in `ints`, laid out in a buffer's worth of int32s."""
    out = np.zeros(self.total, np.int32)
    out[self._positions] = ints
    return out


class _Graph:
  """One captured forward+sample for one Shape, with its persistent input buffers."""
  def __init__(self, runner: ModelRunner, shape: Shape, num_floats: int):
    self.shape, self.runner = shape, runner
    # The model's int inputs (the first five of int_sizes) live on each of its devices, filled from the host, the
    # sampler's on the first device, where it runs: two int buffers and one float buffer, three copies a step, each
    # input a slice of one of them, starting on a 64-byte boundary (a kernel may read it with vector loads).
    devices, sizes = runner.devices, shape.int_sizes
    self.layouts = [_Layout(sizes[:5]), _Layout(sizes[5:])]
    int_bufs = [allocated((layout.total,), dtypes.int32, where)
                for layout, where in zip(self.layouts, (devices, devices[0]))]
    self.int_inputs = [buf[start:start + max(n, 1)] for buf, layout in zip(int_bufs, self.layouts)
                       for start, n in zip(layout.starts, layout.sizes)]
    self.floats = allocated((num_floats,), dtypes.float32, devices[0])
    self.inputs = tuple(t.uop.buffer for t in (*int_bufs, self.floats))
    # BEAM searches decode graphs only: they replay every step, while each prefill chunk length is a shape of its own,
    # minutes of search on a GPU for a graph that may run once
    self.compile_options = runner.compile_options if shape.Q == 1 else {}
    self.output: Buffer | None = None      # the captured graph's output buffer, the same on every replay
    # (_forward returns a contiguous tensor: a realized result may otherwise be a permuted view of its buffer)
    # The input buffers are read by the graph as it reads the weights, not passed to it as arguments: they are the
    # same buffers on every call, refilled in place, and an argument costs a parameter update of every kernel node
    # that reads it at every replay (tables, positions and slots are read by every layer): 0.75 -> 0.51 ms a step
    # of the tiny model on CPU.
    self.jit = TinyJit(lambda: self._forward(*self.int_inputs, self.floats))
    # captured on the first call, not the second: the weights, pools and inputs are all realized before it, so the
    # plain run TinyJit makes first would only trace and compile the graph once more (~4 s on CPU, for every shape)
    self.jit.cnt = 1

  def _forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, tables: Tensor, logits_index: Tensor,
               sampler_ints: Tensor, next_tokens: Tensor, floats: Tensor) -> Tensor:
    sh, model, kv = self.shape, self.runner.model, self.runner.kv_cache
    batch = ForwardBatch(tokens.reshape(sh.S, sh.Q), positions.reshape(sh.S, sh.Q), slots,
                         tables.reshape(sh.S, sh.NB), logits_index, self.runner.block_size, self.runner.paged_decode)
    params = unpack(sampler_ints, floats, sh.S, sh.plan)
    to_sampler = lambda logits: logits.to(self.runner.devices[0])   # from every device (tensor parallel) to the first
    if sh.plan.num_prompt_logprobs is None:
      return sample(to_sampler(model(batch, kv)), params, sh.plan).flatten().contiguous().realize()
    every = model(batch, kv, every_position=True)                                     # [S * Q, vocab]
    V = every.shape[1]
    last = every.reshape(sh.S, sh.Q, V).gather(1, logits_index.reshape(sh.S, 1, 1).expand(sh.S, 1, V)).reshape(sh.S, V)
    prompt = prompt_logprobs(to_sampler(every), next_tokens, params["temperature"], sh.plan.num_prompt_logprobs)
    return sample(to_sampler(last), params, sh.plan).flatten().cat(prompt.flatten()).contiguous().realize()

  def launch(self, ints: np.ndarray, floats: np.ndarray) -> None:
    """Fill the inputs and queue the graph on the device; returns before the device is done."""
    parts = np.split(ints, [sum(self.layouts[0].sizes)])          # the model's ints, the sampler's
    packed = [layout.pack(part) for layout, part in zip(self.layouts, parts)]
    for buf, src in zip(self.inputs, (*packed, floats)): upload(buf, src)
    with Context(**self.compile_options): out = self.jit()   # compiles in here
    if self.output is None: self.output = out.uop.buffer

  def read(self) -> np.ndarray:
    """The last launch's output: waits for the device."""
    return download(self.output)


class ModelRunner:
  def __init__(self, model: LlamaForCausalLM, devices: tuple[str, ...], num_blocks: int, block_size: int, kv_dtype,
               stop_ids: set[int], seed: int = 0, beam: int = 0, paged_decode: bool = True):
    """`devices`: the model's, more than one when tensor parallelism splits it; the KV pool is then split by KV head
    the same way, and the host's inputs and outputs stay on the first device. `beam`: tinygrad's kernel search width
    for the decode graphs' kernels (0: tinygrad's own setting, its BEAM variable, off by default). `paged_decode`:
    decoding rows attend straight from the pool (model/paged_attention.py) rather than from a gathered copy."""
    cfg = model.config
    self.model, self.block_size, self.seed, self.stop_ids, self.devices = model, block_size, seed, stop_ids, devices
    self.paged_decode = paged_decode
    self.compile_options = {"BEAM": beam} if beam else {}
    self.kv_cache = [tuple(new_pool(num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype, devices)
                           for _ in range(2)) for _ in range(cfg.num_layers)]
    Tensor.realize(*(pool for pools in self.kv_cache for pool in pools))
    self.graphs: dict[Shape, _Graph] = {}

  def prepare(self, scheduled: list[ScheduledSequence], block_manager: BlockManager) -> PreparedStep:
    """The inputs of the forward passes that compute the scheduled tokens' K/V and sample the next token of every
    sequence whose tokens are then all computed. Decoding rows run together as one batch; prefill chunks run batched
    with the chunks of the same Q bucket. Needs no token of the step before: those are filled in by `launch`."""
    is_decode = lambda s: s.num_new_tokens == 1 and not s.seq.wants_prompt_logprobs
    decodes = [s for s in scheduled if is_decode(s)]
    groups, prefills = ([decodes] if decodes else []), {}
    for s in scheduled:
      if is_decode(s): continue
      if s.seq.wants_prompt_logprobs: groups.append([s])      # prompt logprobs come back for a row of its own
      else: prefills.setdefault(bucket(s.num_new_tokens, 16), []).append(s)
    groups += prefills.values()
    return PreparedStep(scheduled, [self._prepare_group(group, block_manager, group is decodes) for group in groups])

  @staticmethod
  def can_run_ahead(step: PreparedStep) -> bool:
    """Whether the next step may be prepared before this one's tokens reach the host: no sampler may need them
    before `launch` (penalties count the tokens generated), and no prompt logprobs may still be on their way."""
    return not any(s.samples and (penalized(s.seq.params) or s.seq.wants_prompt_logprobs) for s in step.scheduled)

  def launch(self, step: PreparedStep, before: StepResult | None = None) -> PreparedStep:
    """Queue the step's graphs on the device, with the tokens `before` sampled for its decode rows; returns while
    the device computes the last of them (the others are read back at once: two groups of one shape replay the
    same graph, whose output buffer the second replay overwrites)."""
    for i, group in enumerate(step.groups):
      for index, seq in group.unknown_tokens: group.ints[index] = before.sampled[seq].token
      group.graph.launch(group.ints, group.floats)
      if i < len(step.groups) - 1: group.output = group.graph.read()
    return step

  def collect(self, step: PreparedStep) -> StepResult:
    """Wait for a launched step; its sampled tokens (and prompt logprobs) on the host."""
    result = StepResult({}, {})
    for group in step.groups:
      out, shape = group.graph.read() if group.output is None else group.output, group.graph.shape
      sampled, prompt = out[:shape.S * shape.plan.output_width].reshape(shape.S, -1), out[shape.S * shape.plan.output_width:]
      for i, s in enumerate(group.rows):
        if s.samples: result.sampled[s.seq] = self._sampled(sampled[i], shape.plan)
        if shape.plan.num_prompt_logprobs is not None:       # a row of its own that asked for them
          result.prompt_logprobs[s.seq] = self._prompt_logprobs(s, prompt, shape)
    return result

  def _prepare_group(self, group: list[ScheduledSequence], bm: BlockManager, decoding: bool) -> _Group:
    Q = 1 if decoding else bucket(max(s.num_new_tokens for s in group), 16)
    NB = bucket(max(-(-(s.start + s.num_new_tokens) // self.block_size) for s in group), 4)
    rows: list[Sequence | None] = [s.seq for s in group]
    rows += [None] * (bucket(len(group)) - len(group))
    plan, sampler_ints, floats = plan_and_pack(rows, self.seed, self.stop_ids)
    shape = Shape(len(rows), Q, NB, plan)
    ints = np.concatenate([self._int_inputs(group, shape, bm), sampler_ints, self._next_prompt_tokens(group, shape)])
    if shape not in self.graphs: self.graphs[shape] = _Graph(self, shape, floats.size)
    # a decode row's token is the first of its int inputs; it is unknown while the step before is sampling it
    unknown = [(row, s.seq) for row, s in enumerate(group) if decoding and s.start == s.seq.num_known_tokens]
    return _Group(group, self.graphs[shape], ints, floats, unknown)

  @staticmethod
  def _sampled(row: np.ndarray, plan: SamplingPlan) -> Sampled:
    if not plan.want_logprobs: return Sampled(int(row[0]))
    K = plan.num_logprobs
    return Sampled(int(row[0]), float(row[1]), [(int(i), float(lp)) for i, lp in zip(row[2:2 + K], row[2 + K:])])

  @staticmethod
  def _prompt_logprobs(s: ScheduledSequence, out: np.ndarray, shape: Shape) -> list[dict[int, float]]:
    """{next prompt token: logprob, top ids: logprobs} for each computed position that predicts a prompt token."""
    seq, P = s.seq, shape.plan.num_prompt_logprobs
    n = min(s.num_new_tokens, len(seq.prompt_token_ids) - 1 - s.start)
    rows = out.reshape(shape.S * shape.Q, -1)[:n]     # S is 1: prompt logprobs run in a row of their own
    targets = seq.prompt_token_ids[s.start + 1:][:n]
    top = seq.params.prompt_logprobs
    return [{t: float(r[0]), **{int(i): float(lp) for i, lp in zip(r[1:1 + top], r[1 + P:1 + P + top])}}
            for t, r in zip(targets, rows)]

  def _next_prompt_tokens(self, group: list[ScheduledSequence], shape: Shape) -> np.ndarray:
    """For prompt logprobs: the prompt token that follows each computed position (0 past the prompt)."""
    if shape.plan.num_prompt_logprobs is None: return np.zeros(0, np.int32)
    targets = np.zeros((shape.S, shape.Q), np.int32)
    for i, s in enumerate(group):
      following = s.seq.prompt_token_ids[s.start + 1:][:s.num_new_tokens]
      targets[i, :len(following)] = following
    return targets.ravel()

  def _int_inputs(self, group: list[ScheduledSequence], shape: Shape, bm: BlockManager) -> np.ndarray:
    """tokens, positions, slots [S, Q], block tables [S, NB], logits index [S], concatenated. Built as Python lists
    and turned into arrays once: a numpy assignment per row and field cost 0.9 ms a step at batch 256."""
    S, Q, NB = shape.S, shape.Q, shape.NB
    null_slot, pad = NULL_BLOCK * self.block_size, [0] * Q
    tokens, positions, slots, tables, logits_index = [], [], [], [], []
    for seq, n, start in ((s.seq, s.num_new_tokens, s.start) for s in group):
      P, table = len(seq.prompt_token_ids), seq.block_table
      # slice prompt or output directly: seq.token_ids copies both lists, for every row of every step
      new = seq.output_token_ids[start - P:start - P + n] if start >= P else \
        seq.prompt_token_ids[start:start + n] if start + n <= P else seq.token_ids[start:start + n]
      tokens += new + pad[len(new):]          # a token still being sampled is filled in at launch
      positions += [*range(start, start + n)] + pad[n:]
      slots += [bm.slot(seq, p) for p in range(start, start + n)] + [null_slot] * (Q - n)
      tables += table + [NULL_BLOCK] * (NB - len(table))
      logits_index.append(n - 1)
    rows = S - len(group)                                     # padding rows: token 0 at the null block's slot
    ints = [tokens, [0] * (rows * Q), positions, [0] * (rows * Q), slots, [null_slot] * (rows * Q),
            tables, [NULL_BLOCK] * (rows * NB), logits_index, [0] * rows]
    return np.fromiter(itertools.chain.from_iterable(ints), np.int32)

  def warmup(self, max_num_seqs: int) -> float:
    """Capture the greedy decode graph of every batch bucket at the shortest context; returns seconds spent."""
    t0 = time.perf_counter()
    for S in (1 << i for i in range(max_num_seqs.bit_length() + 1)):
      if S > bucket(max_num_seqs): break
      plan, sampler_ints, floats = plan_and_pack([None] * S, self.seed, self.stop_ids)
      shape = Shape(S, 1, 4, plan)
      if shape not in self.graphs: self.graphs[shape] = _Graph(self, shape, floats.size)
      self.graphs[shape].launch(np.zeros(sum(shape.int_sizes), np.int32), floats)
      self.graphs[shape].read()
    return time.perf_counter() - t0
