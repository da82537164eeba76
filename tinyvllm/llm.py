"""The offline API, named as in vLLM: `LLM(model).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations
import dataclasses
from tinyvllm.engine_args import EngineArgs
from tinyvllm.parallel.data_parallel import DataParallelEngine
from tinyvllm.diffusion.llada import wants_diffusion
from tinyvllm.engine.engine import LLMEngine, RequestOutput
from tinyvllm.formats.tokenizer import Tokenizer
from tinyvllm.model.generation_config import generation_defaults
from tinyvllm.model.loader import resolve
from tinyvllm.sampling_params import SamplingParams

Prompt = str | dict     # a string, or {"prompt_token_ids": [...]}


def create_engine(args: EngineArgs) -> LLMEngine | DataParallelEngine:
  """The LLMEngine (a diffusion LM's too: engine/denoising.py), or with data_parallel_size > 1 that many of them
  behind a DataParallelEngine."""
  if args.data_parallel_size < 1:
    raise ValueError(f"data_parallel_size must be at least 1, got {args.data_parallel_size}")
  if wants_diffusion(args.model) and args.data_parallel_size > 1:
    raise ValueError("data_parallel_size > 1 runs autoregressive models only")
  return DataParallelEngine(args) if args.data_parallel_size > 1 else LLMEngine(args)


def sampling_defaults(args: EngineArgs) -> dict:
  """The model's own sampling defaults (model/generation_config.py): none for random weights, nor for diffusion
  models, whose sampling fields are their own."""
  if args.load_format == "dummy" or wants_diffusion(args.model): return {}
  try: path = resolve(args.model)
  except FileNotFoundError: return {}                 # the engine reports it, as it loads
  return generation_defaults(args.generation_config, path)


class LLM:
  def __init__(self, model: str | None = None, **engine_args):
    """`model`: None (the embedded SmolLM2), a GGUF file, a Hugging Face directory or repo id; "diffusion" (or a
    LLaDA/Dream checkpoint) gives a masked-diffusion model, through the same engine and API."""
    args = EngineArgs.from_kwargs(model=model, **engine_args)
    self.defaults = sampling_defaults(args)
    self.engine = create_engine(args)

  def get_tokenizer(self) -> Tokenizer: return self.engine.tokenizer

  def get_default_sampling_params(self) -> SamplingParams:
    """What `generate` uses without sampling_params: the model's defaults (model/generation_config.py; greedy for
    the embedded SmolLM2)."""
    return SamplingParams(**self.defaults)

  def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
               use_tqdm: bool = False) -> list[RequestOutput]:
    """Run every prompt to completion, batched together; outputs come back in the order of `prompts`."""
    prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params or self.get_default_sampling_params()] * len(prompts)
    if len(params) != len(prompts): raise ValueError("need one SamplingParams per prompt, or a single one for all")
    params = [dataclasses.replace(p, output_kind="final_only") for p in params]   # no per-step outputs to build
    ids = [self.engine.add_request(p if isinstance(p, str) else p["prompt_token_ids"], sp)
           for p, sp in zip(prompts, params)]
    finished: dict[str, RequestOutput] = {}
    while self.engine.has_unfinished_requests():
      for out in self.engine.step():
        if out.finished: finished[out.request_id] = out
    return [finished[i] for i in ids]

  def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
           add_generation_prompt: bool = True) -> list[RequestOutput]:
    conversations = [messages] if messages and isinstance(messages[0], dict) else messages
    tok = self.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)}
               for c in conversations]
    return self.generate(prompts, sampling_params)
