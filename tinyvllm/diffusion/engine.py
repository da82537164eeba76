"""The engine for diffusion LMs: the same interface as `LLMEngine` (`Engine` in engine/protocol.py, and add_request;
RequestOutputs out), so `LLM.generate` and the server drive it unchanged.

    add_request ──► Denoiser (prompt + gen_length masks)
    step():  the first max_num_seqs unfinished sequences ──► one batched forward pass (sampler.denoise_step)
             ──► each commits tokens of its current block ──► a finished block is emitted (the text so far)

A request is emitted only when one of its blocks is finished, so a streaming client sees the answer block by block.
It ends after its last block, or as soon as a finished block holds a stop token (EOS): everything after it would be
EOS padding. `enable_prefix_caching` (an EngineArgs field) switches on Fast-dLLM's block-wise prefix KV cache.
"""
from __future__ import annotations
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from tinyvllm.engine_args import EngineArgs
from tinyvllm.diffusion.sampler import Denoiser, DiffusionParams, denoise_step
from tinyvllm.formats import chat_template
from tinyvllm.formats.tokenizer import tokenize_prompt
from tinyvllm.engine.protocol import CompletionOutput, EngineStats, RequestOutput
from tinyvllm.diffusion.llada import is_diffusion_checkpoint, load_diffusion_model
from tinyvllm.model.loader import DEFAULT_DIFFUSION_MODEL, DIFFUSION_ALIASES, resolve
from tinyvllm.sampling_params import SamplingParams

# sampling fields of left-to-right decoding that masked diffusion does not have (refused rather than ignored)
AUTOREGRESSIVE_ONLY = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                       "logit_bias", "min_tokens", "stop", "logprobs", "prompt_logprobs", "structured_outputs")


def wants_diffusion(model: str | None) -> bool:
  """Whether `LLM(model=...)` should get a DiffusionEngine: a diffusion alias or a LLaDA/Dream checkpoint dir."""
  if model in DIFFUSION_ALIASES: return True
  return model is not None and Path(model).expanduser().is_dir() and is_diffusion_checkpoint(Path(model).expanduser())


@dataclass
class DiffusionRequest:
  """A request as DiffusionEngine holds it: its prompt, sampling parameters and n denoisers (one per choice)."""
  request_id: str
  prompt: str | None
  prompt_token_ids: list[int]
  seqs: list[Denoiser]
  sampling: SamplingParams
  arrival_time: float = field(default_factory=time.monotonic)
  first_token_time: float | None = None
  returned: dict[int, tuple[int, int]] = field(default_factory=dict)   # "delta" outputs: tokens, chars sent per seq


class DiffusionEngine:
  def __init__(self, args: EngineArgs):
    t0 = time.perf_counter()
    self.args = args = args.sized_for_device()
    if args.tensor_parallel_size > 1: raise ValueError("diffusion models run on one device: tensor_parallel_size=1")
    path = DEFAULT_DIFFUSION_MODEL if args.model in (None, *DIFFUSION_ALIASES) else resolve(args.model)
    self.model, self.tokenizer = load_diffusion_model(path, args.compute_dtype())
    self.model_config = self.model.config.model
    if args.chat_template is not None:
      self.tokenizer.chat_template = chat_template.compile_checked(chat_template.load_override(args.chat_template))
    self.load_time = time.perf_counter() - t0
    self.max_model_len = min(args.max_model_len or self.model_config.max_position_embeddings,
                             self.model_config.max_position_embeddings)
    self.use_cache = args.enable_prefix_caching
    self.requests: dict[str, DiffusionRequest] = {}
    self._ids, self._seeds = itertools.count(), itertools.count()
    self.model_calls = 0                            # batched forward passes, for benchmarks

  # ---- requests in ------------------------------------------------------------------------------------------------
  def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                  request_id: str | None = None) -> str:
    return self.admit(self.make_request(prompt, params, request_id))

  def admit(self, request: DiffusionRequest) -> str:
    self.requests[request.request_id] = request
    return request.request_id

  def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                   request_id: str | None = None) -> DiffusionRequest:
    """Tokenize and validate (ValueError for the user); the engine's state is untouched until `admit`."""
    params = params or SamplingParams()
    request_id = request_id if request_id is not None else str(next(self._ids))
    if request_id in self.requests: raise ValueError(f"request id {request_id!r} is already in use")
    token_ids = tokenize_prompt(prompt, self.tokenizer, self.model_config.vocab_size)
    unsupported = [name for name in AUTOREGRESSIVE_ONLY if getattr(params, name) != getattr(SamplingParams(), name)]
    if unsupported: raise ValueError(f"diffusion models do not support {', '.join(unsupported)}")
    dp = DiffusionParams.from_sampling_params(params)
    if len(token_ids) + dp.gen_length > self.max_model_len:
      raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({dp.gen_length}) exceeds "
                       f"max_model_len={self.max_model_len}")
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.stop_ids)
    seed = params.seed if params.seed is not None else self.args.seed * 1_000_003 + next(self._seeds)
    seqs = [Denoiser(token_ids, DiffusionParams(**{**dp.__dict__, "seed": seed + i}), self.model.config.mask_token_id,
                     stop_ids) for i in range(params.n)]
    return DiffusionRequest(request_id, prompt if isinstance(prompt, str) else None, token_ids, seqs, params)

  def abort_request(self, request_id: str) -> None: self.requests.pop(request_id, None)

  def has_unfinished_requests(self) -> bool: return bool(self.requests)

  def warmup(self) -> float:
    """Nothing is captured ahead: diffusion/sampler.py compiles a graph per batch shape when it first meets it.
    Returns 0."""
    return 0.0

  def stats(self) -> EngineStats:
    """No KV pool and no preemption here: every unfinished sequence runs at each step, up to max_num_seqs."""
    unfinished = sum(not s.finished for r in self.requests.values() for s in r.seqs)
    running = min(unfinished, self.args.max_num_seqs)
    return EngineStats(running=running, waiting=unfinished - running)

  # ---- the loop ---------------------------------------------------------------------------------------------------
  def step(self) -> list[RequestOutput]:
    running = [s for r in self.requests.values() for s in r.seqs if not s.finished][:self.args.max_num_seqs]
    if not running: return []
    block_done = denoise_step(self.model, running, self.use_cache)
    self.model_calls += 1
    now, emitted = time.monotonic(), {id(s) for s, done in zip(running, block_done) if done}
    outputs = []
    for request in list(self.requests.values()):
      if not any(id(s) in emitted for s in request.seqs): continue
      request.first_token_time = request.first_token_time or now
      if (out := self._output(request)) is None: continue
      outputs.append(out)
      if out.finished: del self.requests[request.request_id]
    return outputs

  def _output(self, request: DiffusionRequest) -> RequestOutput | None:
    """Committed tokens so far, as the request's `output_kind` asks (see Request.output, engine/protocol.py)."""
    finished = all(s.finished for s in request.seqs)
    kind = request.sampling.output_kind
    if kind == "final_only" and not finished: return None
    outs = []
    for i, seq in enumerate(request.seqs):
      ids = seq.committed().tolist()
      stop_at = next((j for j, t in enumerate(ids) if t in seq.stop_ids), None)
      reason = None if not seq.finished else ("stop" if stop_at is not None else "length")
      if stop_at is not None: ids = ids[:stop_at + (ids[stop_at] in request.sampling.stop_token_ids)]
      text = self.tokenizer.decode(ids, skip_special_tokens=request.sampling.skip_special_tokens)
      if kind == "delta":
        (tokens, chars), request.returned[i] = request.returned.get(i, (0, 0)), (len(ids), len(text))
        ids, text = ids[tokens:], text[chars:]
      outs.append(CompletionOutput(i, text, ids, reason))
    metrics = {"arrival_time": request.arrival_time, "first_token_time": request.first_token_time,
               "model_calls": sum(s.calls for s in request.seqs)}
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs, finished, metrics)
