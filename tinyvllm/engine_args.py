"""Engine arguments, with vLLM's names, and the few decisions derived from them in one place.

Compute dtype per backend is chosen here from measurement: on CPU tinygrad's fp16 matmuls run ~6× slower than fp32
(1 GB/s vs 6.7 GB/s for the same matvec), so CPUs compute in float32; GPUs in float16. On CPU quantized GGUF weights
stay packed (kernels/quantized.py: its matmul kernel runs ~10× faster than tinygrad's float32 matvec there); GPUs
dequantize them at load to use their float16 matmuls until the packed kernel is measured there. Decoding rows attend
straight from the paged pool on every backend (kernels/paged_attention.py: on CPU one kernel a layer instead of seven,
batch-1 SmolLM2 decode 18.0 → 14.5 ms a step; on an H200 a thread block per KV head, a batch-256 layer 84 vs 254 µs
gathered).
"""
from __future__ import annotations
import argparse
import typing
from dataclasses import dataclass, fields, replace
from tinygrad import Device, dtypes
from tinygrad.dtype import DType
from tinyvllm.model.config import ModelConfig

# Named shapes for load_format="dummy": random weights of a real model's size, no weight files needed.
SHAPES: dict[str, dict] = {
  "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True),
  "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
  "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, head_dim=64,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
  "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                   max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
  "qwen3-0.6b": dict(architectures=["Qwen3ForCausalLM"], hidden_size=1024, intermediate_size=3072,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     vocab_size=151936, rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=40960,
                     rms_norm_eps=1e-6),
  "mistral-7b": dict(architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                     rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-5,
                     sliding_window=4096),
  "gemma-3-270m": dict(architectures=["Gemma3ForCausalLM"], hidden_size=640, intermediate_size=2048,
                       num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       vocab_size=262144, rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=512,
                       query_pre_attn_scalar=256),
  # diffusion LMs (engine/denoising.py): a [MASK] id makes the shape one
  "tiny-diffusion": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, mask_token_id=511),
  "tiny-block-diffusion": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, mask_token_id=511,
                               logits_shift=1, block_causal=True),
  "llada-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32, vocab_size=126464, rope_theta=500000.0, tie_word_embeddings=False,
                   max_position_embeddings=4096, rms_norm_eps=1e-5, mask_token_id=126336),
  "dream-7b": dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                   rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-6,
                   mask_token_id=151666, logits_shift=1),
}
DIFFUSION_FIELDS = ("mask_token_id", "logits_shift", "block_causal")      # of a shape: a diffusion LM's, not in a Llama config


@dataclass
class EngineArgs:
  model: str | None = None                 # None: the embedded SmolLM2-135M-Instruct
  load_format: str = "auto"                # "auto" | "dummy" (random weights; `shape` names the size)
  shape: str = "smollm2-135m"              # for load_format="dummy": a key of SHAPES
  dtype: str = "auto"                      # "auto" | "float32" | "float16" | "bfloat16"
  device: str | None = None                # tinygrad device ("CPU", "CUDA", "METAL"); None: tinygrad's default
  block_size: int = 16                     # tokens per KV block
  num_kv_blocks: int | None = None         # KV pool size; None: from kv_cache_memory_gb
  kv_cache_memory_gb: float | None = None  # KV pool budget per device (vLLM's is per GPU) without num_kv_blocks;
                                           # None: 1 on a CPU, on a GPU what gpu_memory_utilization leaves
  gpu_memory_utilization: float = 0.9      # share of a GPU's memory the engine may fill: weights, graphs, KV pool
  max_num_seqs: int | None = None          # sequences per step; None: 64 on a CPU, 256 on a GPU
  max_num_batched_tokens: int | None = None   # tokens per step (decodes + prefill chunks); None: 256 on a CPU,
                                              # 2048 on a GPU
  max_model_len: int | None = None         # prompt + output limit; None: the model's context length
  enable_chunked_prefill: bool = True
  enable_prefix_caching: bool = True
  async_scheduling: bool = True            # schedule step k+1 and build its inputs while the device runs step k
  seed: int = 0
  packed_weights: bool | None = None       # GGUF Q4_0/Q4_1/Q8_0 matrices stay packed; None: where it measured faster
  tensor_parallel_size: int = 1            # split heads and MLP across this many devices (parallel/tensor_parallel.py)
  data_parallel_size: int = 1              # this many engine processes, each with the whole model
                                           # (parallel/data_parallel.py)
  attention_backend: str = "paged"         # "paged" (kernels read the pool through the block tables) or "gather"
                                           # (the readable reference: copy each token's context out, then
                                           # tinygrad's matmuls and softmax)
  kernels: str = "fast"                    # "fast" or "reference": tinygrad's plain operations throughout, the
                                           # readable forward pass the fast kernels are tested against (implies
                                           # attention_backend="gather" and unpacked weights; kernels/linear.py)
  jump_forward: bool = True                # tokens a grammar forces are checked in one step (structured outputs)
  speculative_config: str | dict | None = None   # vLLM's JSON: {"method": "ngram", "num_speculative_tokens": k,
                                           # "prompt_lookup_max": n, "prompt_lookup_min": m} (engine/speculative.py)
  diffusion_recompute: bool = False        # a diffusion LM computes its whole sequence every step (LLaDA's reference
                                           # algorithm) instead of caching the prompt and finished blocks
                                           # (engine/denoising.py)
  diffusion_max_block_length: int = 128    # a diffusion LM's longest block: a step samples at most max_num_seqs × this
                                           # many rows of logits (longer blocks are refused)
  generation_config: str = "auto"          # sampling defaults for unset fields: "auto" (the model's), "vllm"
                                           # (none), or a folder with generation_config.json
                                           # (model/generation_config.py)
  chat_template: str | None = None         # a Jinja file or string used instead of the checkpoint's chat template
                                           # (formats/chat_template.py)
  beam: int = 0                            # tinygrad's BEAM kernel search for decode-sized graphs (0: its BEAM variable,
                                           # off by default); 2 pays on GPUs: minutes per graph shape once, then cached

  @staticmethod
  def add_cli_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One flag per field, spelled as in vLLM: max_num_seqs → --max-num-seqs, a boolean b → --b / --no-b."""
    hints = typing.get_type_hints(EngineArgs)
    for f in fields(EngineArgs):
      flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
      kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)     # int | None → int
      if kind is bool: parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                           help="default: %(default)s")
      else: parser.add_argument(flag, type=kind, default=f.default, metavar=f.name.upper(), help="default: %(default)s")

  @classmethod
  def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

  @classmethod
  def from_kwargs(cls, **kwargs) -> EngineArgs:
    known = {f.name for f in fields(cls)}
    unknown = set(kwargs) - known
    if unknown: raise TypeError(f"unknown engine argument(s): {', '.join(sorted(unknown))}")
    return cls(**kwargs)

  def devices(self) -> tuple[str, ...]:
    """`tensor_parallel_size` devices of the engine's kind, counting up from its own: CPU → ("CPU", "CPU:1", ...),
    CUDA:2 → ("CUDA:2", "CUDA:3", ...). "CPU:1" is a tinygrad device of its own (own buffers and queue, same RAM),
    so tensor parallelism runs, and is tested, on a CPU too."""
    n = self.tensor_parallel_size
    if n < 1: raise ValueError(f"tensor_parallel_size must be at least 1, got {n}")
    kind, _, index = Device.canonicalize(self.device).partition(":")
    return tuple(Device.canonicalize(f"{kind}:{int(index or 0) + i}") for i in range(n))

  def for_rank(self, rank: int) -> EngineArgs:
    """Data-parallel rank `rank`'s engine: its devices come after the previous rank's, its sampling seed differs."""
    kind, _, index = Device.canonicalize(self.device).partition(":")
    device = Device.canonicalize(f"{kind}:{int(index or 0) + rank * self.tensor_parallel_size}")
    return replace(self, device=device, data_parallel_size=1, seed=self.seed + rank)

  def dummy_config(self) -> ModelConfig:
    """The network of `shape`, for load_format="dummy"."""
    shape = SHAPES[self.shape]
    llama = {"architectures": ["LlamaForCausalLM"], **{k: v for k, v in shape.items() if k not in DIFFUSION_FIELDS}}
    return replace(ModelConfig.from_hf(llama), **{k: v for k, v in shape.items() if k in DIFFUSION_FIELDS})

  def _on_cpu(self) -> bool: return (self.device or Device.DEFAULT).split(":")[0] in ("CPU", "PYTHON")

  def sized_for_device(self) -> EngineArgs:
    """The step sizes left unset, filled in for the device, as vLLM's defaults are. A 2-core CPU's steps are small:
    its weights are read at ~20 GB/s and a step of 256 tokens is already compute-bound there. A GPU batches 256
    sequences (the 256 × (128, 128) benchmark: 9,915 output tok/s on an H100 with 64 and 256 tokens a step, 26,962
    with 256 and 8,192) and 2,048 tokens a step, vLLM's server default, enough to make a prompt chunk compute-bound."""
    cpu = self._on_cpu()
    return replace(self, max_num_seqs=self.max_num_seqs or (64 if cpu else 256),
                   max_num_batched_tokens=self.max_num_batched_tokens or (256 if cpu else 2048))

  def kv_cache_bytes(self, memory: tuple[int, int] | None, scratch: int) -> int:
    """The KV pool's budget on one device. `memory`: the device's (free, total) bytes once the weights are loaded
    (None for a CPU); `scratch`: what the graphs will take besides. On a GPU the pool takes the rest of
    gpu_memory_utilization's share, as vLLM's does."""
    if self.kv_cache_memory_gb is not None: return int(self.kv_cache_memory_gb * 2**30)
    if memory is None: return 2**30
    if not 0 < self.gpu_memory_utilization <= 1:
      raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
    free, total = memory
    budget = max(0, int(self.gpu_memory_utilization * total) - (total - free) - scratch)
    return budget // 2**28 * 2**28   # whole 256 MiB: a restart sizes the same pool, so it loads its stored graphs

  def graph_scratch_bytes(self, cfg) -> int:
    """An estimate of the device memory the runner's graphs take besides the weights and the KV pool, which a GPU's
    pool leaves free: each model graph's activations for its T tokens (the T of all graphs sum to twice the largest),
    and the float32 [T, vocab] buffers of the prompt-logprobs graphs (logits, log-softmax, the sampler's work on
    them): on an H100, Llama-1B at 2,048 tokens a step, the 29 graphs took 7.6 GiB; this gives 8.7 GB."""
    T = 1 << (self.max_num_batched_tokens - 1).bit_length()      # the largest graph's tokens, a power of two
    per_token = (3 * cfg.intermediate_size + 4 * cfg.hidden_size + 2 * cfg.num_heads * cfg.head_dim) * \
      self.compute_dtype().itemsize
    return 2 * T * per_token + 8 * T * cfg.vocab_size * 4

  def kv_blocks(self, cfg, max_model_len: int, memory: tuple[int, int] | None) -> int:
    """The KV pool's size in blocks (the null block included): its budget (`kv_cache_bytes`) over one block's bytes
    on one device, and never more than every sequence at full length could use. The budget is per device, as in
    vLLM: tensor parallelism splits every block N ways by KV head."""
    kv_heads_per_device = cfg.num_kv_heads // self.tensor_parallel_size
    bytes_per_block = 2 * cfg.num_layers * self.block_size * kv_heads_per_device * cfg.head_dim * \
      self.compute_dtype().itemsize
    budget_blocks = self.kv_cache_bytes(memory, self.graph_scratch_bytes(cfg)) // bytes_per_block
    return 1 + min(budget_blocks, self.max_num_seqs * -(-max_model_len // self.block_size))

  def compute_dtype(self) -> DType:
    if self.dtype != "auto": return getattr(dtypes, self.dtype)
    return dtypes.float32 if self._on_cpu() else dtypes.float16

  def paged_attention(self) -> bool:
    if self.attention_backend not in ("paged", "gather"):
      raise ValueError(f"attention_backend must be 'paged' or 'gather', got {self.attention_backend!r}")
    return self.attention_backend == "paged" and not self.reference_kernels()

  def reference_kernels(self) -> bool:
    if self.kernels not in ("fast", "reference"):
      raise ValueError(f"kernels must be 'fast' or 'reference', got {self.kernels!r}")
    return self.kernels == "reference"

  def keep_weights_packed(self) -> bool:
    if self.reference_kernels():
      if self.packed_weights: raise ValueError("kernels='reference' multiplies unpacked weights: drop packed_weights")
      return False
    if self.packed_weights is not None: return self.packed_weights
    return self._on_cpu()
