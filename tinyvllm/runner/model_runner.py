"""Turns a scheduled step into fixed-shape device buffers and runs it as two TinyJit graphs: the model, then the sampler.

Each step runs in one of a bounded set of TinyJit graphs, all captured before a server is ready (graphs.py): a model
graph per token count T and a sampler graph per row count R and sampling plan. A step's tokens and rows are padded
to the graph's size, and what varies from step to step travels as inputs:

    a step's tokens, flattened:   [ decode A | decode B | chunk of C's prompt ........ | padding ]   T tokens
                                      │          │                       │
    their sequences' block tables:  row 0      row 1                   row 2      (R rows, `blocks` columns each)
    logits come out for:            A          B                       C (its chunk's last token)   R rows
    (a sequence checking k drafts brings k + 1 tokens and gets k + 1 rows: engine/speculative.py)

What would otherwise multiply the graphs is kept out of their shapes:
- the context length: the block tables are a flat buffer, row r at r * blocks, and `blocks` (the step's longest
  context, in blocks) is a variable bound per step (`paged_attention.context_blocks`), so the attention kernels
  loop over the blocks in use and one graph serves every context length up to max_model_len;
- the mix of decodes and prompt chunks: every token of a step is one row of the same flat batch (each attends to
  its own sequence's context through `rows`, the table row of each token), so one graph runs the whole step and
  the weights are read once for all of it;
- the sampling parameters: per-row values travel as inputs, and only three plans exist (sampler.py).
Rows and tokens are padded up to their bucket (padding tokens write to the null block; padding rows sample
greedily and are dropped).

A step is prepared (its inputs built on the host), launched (the inputs copied in, the graphs queued) and collected
(its output read back) in three calls, so that the engine can prepare the next step while the device runs this one
(engine/overlap.py: async scheduling). What a prepared step cannot know yet, the tokens the step before it is
sampling, is written into its inputs at launch.

Host <-> device copies go straight through the device's allocator (tinygrad_internals.py): tinygrad's own copies
schedule a graph on every call, which costs more Python per step than a small model's whole step takes on a GPU.
"""
from __future__ import annotations
import itertools
from dataclasses import dataclass, field
import numpy as np
from tinygrad import Tensor
from tinyvllm.engine.block_manager import BlockManager, NULL_BLOCK
from tinyvllm.engine.denoising import DenoisingRow
from tinyvllm.engine.scheduler import ScheduledSequence
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.speculative import AfterDrafts
from tinyvllm.kernels.paged_attention import new_pool
from tinyvllm.model.llama import LlamaForCausalLM
from tinyvllm.runner.graphs import Graphs, ModelGraph, ModelShape, SamplerGraph, SamplerShape, input_starts
from tinyvllm.runner.sampler import SCORED, SamplingPlan, penalized, plan_and_pack


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
  model: ModelGraph
  sampler: SamplerGraph
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


def _sampler_rows(s: ScheduledSequence) -> list[Sequence | AfterDrafts | DenoisingRow]:
  """The rows a scheduled sequence takes in the sampler: one, or one more per draft it checks, or one per position
  of a diffusion LM's block."""
  if not s.samples: return [s.seq]
  if s.seq.denoising is not None: return [DenoisingRow(s.seq, i) for i in range(len(s.seq.denoising.logits_positions()))]
  first = AfterDrafts(s.seq, 0) if s.seq.draft_bias and s.seq.draft_token_ids else s.seq   # APD: biased
  return [first] + [AfterDrafts(s.seq, i) for i in range(1, len(s.seq.draft_token_ids) + 1)]


def _logits_positions(s: ScheduledSequence) -> range:
  """The positions whose logits a scheduled sequence's rows read: its last token, and each draft after it."""
  if s.samples and s.seq.denoising is not None: return s.seq.denoising.logits_positions()
  end = s.start + s.num_new_tokens
  return range(end - 1 - (len(s.seq.draft_token_ids) if s.samples else 0), end)


def _guidance(group: list[ScheduledSequence], per_seq: list[list]) -> tuple[list[int], list[float]]:
  """Classifier-free guidance's inputs for the sampler: each row's partner (a guided sequence's row for block position
  i reads its twin's row for position i, scheduled in the same group) and scale; other rows are their own partners."""
  offsets = list(itertools.accumulate((len(rows) for rows in per_seq), initial=0))
  first = {s.seq: offset for s, offset in zip(group, offsets)}
  partner, scale = list(range(offsets[-1])), [0.0] * offsets[-1]
  for s, rows in zip(group, per_seq):
    if s.seq.twin is None or not s.samples: continue
    for i in range(len(rows)):
      partner[first[s.seq] + i], scale[first[s.seq] + i] = first[s.seq.twin] + i, s.seq.params.cfg_scale
  return partner, scale


class ModelRunner:
  def __init__(self, model: LlamaForCausalLM, devices: tuple[str, ...], num_blocks: int, block_size: int, kv_dtype,
               stop_ids: set[int], max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
               seed: int = 0, beam: int = 0, paged: bool = True, rows_per_seq: int = 1):
    """`devices`: the model's, more than one when tensor parallelism splits it; the KV pool is then split by KV head
    the same way, and the host's inputs and outputs stay on the first device. `beam`, `paged`, `rows_per_seq`:
    graphs.py."""
    cfg = model.config
    self.block_size, self.seed, self.stop_ids = block_size, seed, stop_ids
    self.kv_cache = [tuple(new_pool(num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype, devices)
                           for _ in range(2)) for _ in range(cfg.num_layers)]
    Tensor.realize(*(pool for pools in self.kv_cache for pool in pools))
    self.graphs = Graphs(model, devices, self.kv_cache, block_size, kv_dtype, max_model_len, max_num_seqs,
                         max_num_batched_tokens, seed, stop_ids, beam, paged, rows_per_seq)

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
        n = len(_logits_positions(s))                               # its rows: `_sampler_rows`
        if s.samples: result.sampled[s.seq] = [self._sampled(sampled[i], shape.plan) for i in range(row, row + n)]
        row += n
        if shape.plan.num_prompt_logprobs is not None:       # a group of its own that asked for them
          result.prompt_logprobs[s.seq] = self._prompt_logprobs(s, prompt, shape.plan)
    return result

  def _prepare_group(self, group: list[ScheduledSequence], bm: BlockManager) -> _Group:
    every = group[0].seq.wants_prompt_logprobs
    graphs = self.graphs
    shape = graphs.model_shape(sum(s.num_new_tokens for s in group), every)
    ints, blocks, unknown = self._model_inputs(group, shape, bm)
    # a sampler row per sequence, and one more per draft it checks: the sequence as if the drafts before it held
    per_seq = [_sampler_rows(s) for s in group]
    rows: list[Sequence | AfterDrafts | None] = [row for seq_rows in per_seq for row in seq_rows]
    R = 1 if every else shape.R
    plan, adjusted_ids, floats = plan_and_pack(rows + [None] * (R - len(rows)), self.seed, self.stop_ids,
                                               graphs.max_adjusted, SCORED if graphs.diffusion else None,
                                               graphs.mask_words, _guidance(group, per_seq) if graphs.diffusion else None)
    sampler_shape = SamplerShape(R, plan, shape.T if every else 0)
    sampler_ints = adjusted_ids if not every else \
      np.concatenate([adjusted_ids, [group[0].num_new_tokens - 1], self._next_prompt_tokens(group[0], shape.T)])
    sampler = graphs.sampler_graph(sampler_shape, floats.size)
    # a grammar's row whose last token is still being sampled: its mask is computed at launch (plan_and_pack left
    # every token allowed there)
    masks_at = R * plan.num_adjusted
    unknown_masks = [(masks_at + row * plan.mask_words, seq) for row, seq in enumerate(rows)
                     if isinstance(seq, Sequence) and seq.matcher and seq.num_pending_tokens]
    return _Group(group, graphs.model_graph(shape), sampler, ints, blocks, sampler_ints.astype(np.int32), floats, unknown,
                  unknown_masks)

  def _model_inputs(self, group: list[ScheduledSequence], shape: ModelShape, bm: BlockManager) \
      -> tuple[np.ndarray, int, list[tuple[int, Sequence]]]:
    """tokens, positions, slots, rows, key limits [T] | logits index [R] | block tables [R, blocks], packed as the graph's
    buffer lays them out; the tables' width `blocks`; where the decode rows' still unknown tokens go. Built as
    Python lists and turned into an array once: a numpy assignment per row and field costs ~1 ms a step at
    batch 256."""
    T, R, bs = shape.T, shape.R, self.block_size
    blocks = max(-(-(s.start + s.num_new_tokens) // bs) for s in group)
    null_slot = NULL_BLOCK * bs
    tokens, positions, slots, rows, key_limits, logits_index, tables, unknown = [], [], [], [], [], [], [], []
    for row, s in enumerate(group):
      seq, n, start = s.seq, s.num_new_tokens, s.start
      # a decode row's token is unknown while the step before is sampling it: filled in at launch
      if start == seq.num_known_tokens and seq.num_pending_tokens: unknown.append((len(tokens), seq))
      new = seq.tokens(start, n)
      tokens += new + [0] * (n - len(new))
      positions += range(start, start + n)
      slots += [bm.slot(seq, p) for p in range(start, start + n)]
      rows += [row] * n
      key_limits += range(start, start + n) if seq.denoising is None else seq.denoising.key_limits(start, n)
      first, wanted = len(tokens) - n - start, _logits_positions(s)  # first: where position 0 would be in the batch
      logits_index += range(first + wanted.start, first + wanted.stop)
      table = seq.block_table[:blocks]           # a diffusion LM keeps blocks past the step's end (denoising.py)
      tables += table + [NULL_BLOCK] * (blocks - len(table))
    pad = T - len(tokens)                     # padding tokens: token 0 at the null block's slot, row 0's table
    fields = [tokens + [0] * pad, positions + [0] * pad, slots + [null_slot] * pad, rows + [0] * pad,
              key_limits + [0] * pad, logits_index + [0] * (R - len(logits_index))]
    starts = input_starts(shape)
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
    """Capture (or load) every graph a step can take (graphs.py). Returns (graphs built, seconds)."""
    return self.graphs.warmup()
