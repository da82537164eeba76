"""The engine: one loop that turns requests into tokens. Read `LLMEngine.step` top to bottom to see all of it.

    add_request ──► scheduler.waiting
    step():  schedule ──► model_runner.prepare ──► launch ──► collect ──► append sampled tokens ──► check stops
             (who, how many tokens)  (inputs)   (forward + sample)       (+ detokenize)          (free finished)

`engine/overlap.py` runs the same three parts interleaved with the device (async scheduling, on by default): the
host schedules and packs step k+1 while the device computes step k. Read this file's plain `step` first.

Everything below the engine is one idea each: `scheduler.py` (continuous batching, chunked prefill, preemption),
`block_manager.py` (the paged KV pool), `drafts.py` (tokens a step checks after the last known one), `denoising.py`
(a diffusion LM's block: a multi-token step whose tokens are committed a few at a time),
`runner/model_runner.py` (a step as one flat batch), `runner/graphs.py` (its TinyJit graphs), `runner/sampler.py`,
`model/` (the network).
`AsyncLLMEngine` (async_engine.py) runs the same loop in a background thread for the server;
`parallel/data_parallel.py` runs N engines in processes of their own behind this same interface (`Engine`,
engine/protocol.py).
"""
from __future__ import annotations
import itertools
import logging
import math
import time
from tinygrad import Device
from tinygrad.helpers import DEV, Target
from tinyvllm.engine.block_manager import BlockManager
from tinyvllm.engine_args import EngineArgs
from tinyvllm.formats.detokenizer import update_text
from tinyvllm.engine.protocol import EngineStats, Request, RequestOutput
from tinyvllm.model.loader import load_model
from tinyvllm.formats import chat_template
from tinyvllm.formats.tokenizer import tokenize_prompt
from tinyvllm.engine.overlap import Overlap
from tinyvllm.engine import denoising, structured_output
from tinyvllm.runner.model_runner import ModelRunner, PreparedStep, Sampled, StepResult
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.scheduler import Scheduler
from tinyvllm.engine.sequence import Sequence
from tinyvllm.engine.drafts import Drafts
from tinyvllm.engine.speculative import SpeculativeConfig
from tinyvllm.tinygrad_internals import (device_memory, keep_graphs_loadable, keep_lowered_kernels_on_disk,
                                         share_kernel_cache_between_threads, speed_up_capture)

log = logging.getLogger("tinyvllm.engine")


class LLMEngine:
  def __init__(self, args: EngineArgs):
    share_kernel_cache_between_threads()     # a server builds the engine on a loader thread, then steps it on another
    self.args = args = args.sized_for_device()
    if args.device: DEV.value = Target(device=Device.canonicalize(args.device))   # tinygrad's default from now on
    keep_lowered_kernels_on_disk()
    keep_graphs_loadable()
    speed_up_capture()
    t0 = time.perf_counter()
    dummy_cfg = args.dummy_config() if args.load_format == "dummy" else None
    devices, paged = args.devices(), args.paged_attention()     # both check their arguments, before loading
    self.speculative = SpeculativeConfig.parse(args.speculative_config)
    self.model, self.tokenizer = load_model(args.model, args.compute_dtype(), args.load_format, dummy_cfg,
                                            args.keep_weights_packed(), devices)
    self.model.kernels = args.kernels
    if args.chat_template is not None and self.tokenizer is not None:
      self.tokenizer.chat_template = chat_template.compile_checked(chat_template.load_override(args.chat_template))
    self.model_config = cfg = self.model.config
    self.diffusion = cfg.mask_token_id is not None      # a masked diffusion LM: engine/denoising.py
    self.load_time = time.perf_counter() - t0
    self.max_model_len = min(args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    num_blocks = args.num_kv_blocks or args.kv_blocks(cfg, self.max_model_len, device_memory(devices[0]))
    if args.max_model_len is None and (num_blocks - 1) * args.block_size < self.max_model_len:
      self.max_model_len = (num_blocks - 1) * args.block_size        # unset: as long as the pool holds
      log.warning(f"max_model_len {self.max_model_len}: what the KV pool holds, less than the model's context")
    if (num_blocks - 1) * args.block_size < self.max_model_len:
      raise ValueError(f"the KV pool ({num_blocks - 1} blocks × {args.block_size} tokens) cannot hold one sequence "
                       f"of max_model_len={self.max_model_len}: raise num_kv_blocks/kv_cache_memory_gb or lower "
                       f"max_model_len")
    self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
    self.scheduler = Scheduler(self.block_manager, args.max_num_seqs, args.max_num_batched_tokens,
                               args.enable_chunked_prefill)
    stop_ids = self.tokenizer.stop_ids if self.tokenizer else set()
    self.runner = ModelRunner(self.model, devices, num_blocks, args.block_size, args.compute_dtype(), stop_ids,
                              self.max_model_len, args.max_num_seqs, args.max_num_batched_tokens, args.seed,
                              args.beam, paged, args.diffusion_max_block_length if self.diffusion else 1)
    self.requests: dict[str, Request] = {}
    self.diffusion_counts = [0, 0]      # a diffusion LM's forwards of a sequence, and the tokens they committed
    self.drafts = Drafts(self, self.speculative, num_blocks)     # tokens a step checks after the last known one
    self.overlap = Overlap(self) if args.async_scheduling else None
    self._ids = itertools.count()

  # ---- requests in -------------------------------------------------------------------------------------------
  def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                  request_id: str | None = None) -> str:
    return self.admit(self.make_request(prompt, params, request_id))

  def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                   request_id: str | None = None) -> Request:
    """Tokenize and validate (raises ValueError with a message for the user); does not touch the engine's state."""
    request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
    if request_id in self.requests: raise ValueError(f"request id {request_id!r} is already in use")
    params = params or SamplingParams()
    vocab_size = self.model_config.vocab_size
    token_ids = tokenize_prompt(prompt, self.tokenizer, vocab_size)
    for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
      if any(t >= vocab_size for t in ids): raise ValueError(f"{name}: token ids must be below the vocabulary size {vocab_size}")
    if len(token_ids) >= self.max_model_len:
      raise ValueError(f"prompt has {len(token_ids)} tokens; max_model_len={self.max_model_len} leaves no room "
                       "to generate")
    room = self.max_model_len - len(token_ids)
    limit = room if params.max_tokens is None else min(room, params.max_tokens)
    seqs = [Sequence(request_id, token_ids, params, index, limit) for index in range(params.n)]
    if self.model_config.mask_token_id is not None:                       # a diffusion LM: engine/denoising.py
      seed = params.seed if params.seed is not None else self.args.seed * 1_000_003 + seqs[0].seq_id
      states = denoising.start(params, len(token_ids), self.model_config, self.args.diffusion_recompute, seed,
                               self.max_model_len, self.args.max_num_batched_tokens,
                               self.args.diffusion_max_block_length)
      for seq, state in zip(seqs, states):
        seq.denoising, seq.draft_token_ids = state, state.drafts()
        seq.max_output_tokens = min(state.params.gen_length, limit)        # whole blocks, cut at max_tokens
        if params.cfg_scale > 0:       # guidance: the same sequence with its prompt masked, in the same steps
          seq.twin = Sequence(request_id, [self.model_config.mask_token_id] * len(token_ids), params, index=seq.index,
                              max_output_tokens=seq.max_output_tokens, denoising=state, is_twin=True,
                              draft_token_ids=state.drafts())
    else: denoising.refuse_diffusion_fields(params)
    if params.structured_outputs is not None:
      grammar = structured_output.check(params.structured_outputs, self.tokenizer, vocab_size)
      for seq in seqs: seq.matcher = structured_output.Matcher(self.tokenizer, vocab_size, grammar)
    return Request(request_id, prompt if isinstance(prompt, str) else None, seqs)

  def admit(self, request: Request) -> str:
    self.requests[request.request_id] = request
    for seq in request.seqs: self.scheduler.add(seq)
    return request.request_id

  def abort_request(self, request_id: str) -> None:
    request = self.requests.pop(request_id, None)
    if request is None: return
    for seq in request.seqs:
      if not seq.is_finished: self.scheduler.finish(seq, "abort")

  def has_unfinished_requests(self) -> bool:
    return self.scheduler.has_unfinished() or (self.overlap is not None and self.overlap.in_flight is not None)

  def stats(self) -> EngineStats:
    counts, graphs = self.drafts.counts(), self.runner.graphs
    # a diffusion LM's forwards: this engine's own, or its APD proposer's
    diffusion = self.drafts.proposer.draft.diffusion_counts if self.speculative and self.speculative.method == "apd" \
      else self.diffusion_counts
    return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.block_manager.usage,
                       self.scheduler.num_preemptions, graphs.builds, graphs.build_seconds, graphs.loads,
                       *counts[:3], tuple(counts[3:]), self.drafts.jump_forward_tokens, *diffusion)

  def warmup(self) -> float:
    """Capture every graph a step can need (runner/graphs.py: a bounded set), so that no request ever waits for one;
    returns the seconds it took. Call before serving traffic."""
    built, seconds = self.runner.warmup()
    graphs = self.runner.graphs
    seconds += self.drafts.warmup()                                      # a draft model's engine
    log.info("%d graphs ready in %.1f s: %d captured (%d new kernels compiled), %d loaded from the cache",
             built + graphs.loads, seconds, built, graphs.kernels_compiled, graphs.loads)
    return seconds

  # ---- the loop ---------------------------------------------------------------------------------------------
  def step(self) -> list[RequestOutput]:
    """One step: schedule who runs and how many tokens each, run the forward pass and the sampler, then append the
    sampled tokens, check stops and build outputs. (With async scheduling, overlap.py runs the same three parts so
    that the host's work hides behind the device's.)"""
    if self.overlap: return self.overlap.step()
    step = self.prepare()
    if step is None: return []                                            # nothing could be scheduled
    return self.finish(step, self.runner.collect(self.runner.launch(step)))

  def prepare(self) -> PreparedStep | None:
    if self.wants_drafts(): self.drafts.propose(self.scheduler.running)   # tokens for the step to check
    for seq in self.scheduler.waiting if self.diffusion else ():          # a preempted one's block (preemption
      for s in seq.group: s.draft_token_ids = seq.denoising.drafts()       # drops drafts)
    scheduled = self.scheduler.schedule()                                 # who runs, how many tokens each
    if not scheduled: return None
    step = self.runner.prepare(scheduled, self.block_manager)             # graph inputs
    for item in scheduled:
      item.seq.num_computed_tokens += item.num_new_tokens
      self.block_manager.cache_computed_blocks(item.seq)                  # full blocks join the prefix cache
    return step

  def wants_drafts(self) -> bool:
    """Whether the next step checks drafts (drafts.py); async scheduling waits for this step's tokens then."""
    return self.drafts.wanted(self.scheduler.running)

  def finish(self, step: PreparedStep, result: StepResult) -> list[RequestOutput]:
    now = time.monotonic()
    touched: dict[str, Request] = {}
    for item in step.scheduled:
      seq = item.seq
      request = self.requests.get(seq.request_id)
      if request is None or seq.is_finished or seq.is_twin: continue    # stopped or aborted while this step ran
      if seq.denoising is not None:                                        # a diffusion LM's: output a block at a time
        if seq in result.sampled and self._denoised(seq, result.sampled[seq]):
          request.first_token_time = request.first_token_time or now
          touched[request.request_id] = request
        continue
      touched[request.request_id] = request
      if seq in result.prompt_logprobs:
        start = item.start + 1
        seq.prompt_logprobs[start:start + len(result.prompt_logprobs[seq])] = result.prompt_logprobs[seq]
      if seq not in result.sampled: continue                                # a prefill chunk, not the last one
      request.first_token_time = request.first_token_time or now
      drafts, seq.draft_token_ids, accepted = seq.draft_token_ids, [], 0
      for i, sampled in enumerate(result.sampled[seq]):   # the token after the last known one, then after each draft
        self._append(seq, sampled)
        agrees = i < len(drafts) and sampled.token == drafts[i]
        accepted += agrees
        reason = self._stop_reason(seq)
        if self.tokenizer and update_text(seq, self.tokenizer, finished=reason is not None): reason = "stop"
        if reason:
          self.scheduler.finish(seq, reason)                                # its blocks go back to the pool
          break
        if not agrees: break                                                # the drafts after it are wrong
      if drafts:
        self.drafts.checked(seq, len(drafts), accepted)
        if seq.is_finished: continue
        seq.num_computed_tokens = seq.num_known_tokens - 1                  # a rejected draft's K/V is stale:
        self.block_manager.trim(seq, seq.num_computed_tokens)             # its slots are given back
    outputs = [out for r in touched.values() if (out := r.output()) is not None]
    for out in outputs:
      if out.finished: del self.requests[out.request_id]
    return outputs

  def _denoised(self, seq: Sequence, sampled: list[Sampled]) -> bool:
    """A diffusion LM's step (engine/denoising.py): commit tokens of its block; a finished block becomes output,
    checked for stops token by token. What the next step computes again: `Denoising.kept_after_step`. Returns whether
    output grew."""
    state = seq.denoising
    block = state.update([s.token for s in sampled], [math.exp(s.logprob) for s in sampled])
    self.diffusion_counts[0] += 1
    self.diffusion_counts[1] += state.committed
    for s in seq.group: s.num_computed_tokens = state.kept_after_step(seq.num_known_tokens, block is not None)
    for token in block or []:
      if seq.twin is not None: seq.twin.output_token_ids.append(token)
      self._append(seq, Sampled(token))
      reason = self._stop_reason(seq)
      if self.tokenizer and update_text(seq, self.tokenizer, finished=reason is not None): reason = "stop"
      if reason:
        self.scheduler.finish(seq, reason)
        return True
    for s in seq.group: s.draft_token_ids = state.drafts()   # its blocks stay: the next step computes the same
                                                               # positions
    return block is not None

  @staticmethod
  def _append(seq: Sequence, sampled: Sampled) -> None:
    seq.output_token_ids.append(sampled.token)
    if seq.matcher is not None: seq.matcher.consume(sampled.token)
    if seq.params.logprobs is not None:
      top = dict(sampled.top_logprobs[:seq.params.logprobs])
      seq.output_logprobs.append({sampled.token: sampled.logprob, **top})

  def _stop_reason(self, seq: Sequence) -> str | None:
    p, token, n_out = seq.params, seq.output_token_ids[-1], len(seq.output_token_ids)
    stop_ids = set(p.stop_token_ids)
    if not p.ignore_eos and self.tokenizer is not None: stop_ids |= self.tokenizer.stop_ids
    if token in stop_ids and n_out > p.min_tokens: return "stop"
    if seq.matcher is not None and seq.matcher.done: return "stop"        # its grammar is complete
    if n_out >= seq.max_output_tokens: return "length"                   # max_tokens, or max_model_len
    return None
