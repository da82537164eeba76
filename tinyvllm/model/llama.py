"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2/3) in tinygrad, reading its K/V from a paged pool;
Gemma 3 (gemma3.py) is this decoder with five changes.

    tokens ─ embed ─┬─────────────────────────────┬──────────────────────────────┬─ ... ─ norm ─ lm_head ─ logits
                    └ RMSNorm ─ attention ─ (+) ──┴─ RMSNorm ─ SwiGLU MLP ─ (+) ─┘   × num_layers

- RMSNorm rescales each vector to unit root-mean-square, then by a learned gain (no mean subtraction, no bias).
- RoPE encodes a token's position by rotating pairs of query/key features by position-dependent angles, so the dot
  product q·k depends only on the distance between the two tokens. Pairs are (i, i + head_dim/2) as in Hugging Face.
  Llama-3 checkpoints stretch the low frequencies (`rope_scaling`) to reach longer contexts.
- Grouped-query attention (GQA): several query heads share one K/V head, shrinking the KV cache by that factor.
- SwiGLU: down(silu(gate(x)) * up(x)).
- q/k/v and gate/up are each one projection (`fuse_projections`; the loader stacks their matrices): one matmul
  kernel reads x once instead of three or two times. A model split across devices (parallel/tensor_parallel.py) stays
  unfused.

Each step of a layer is one call, in the order above, and the kernel that runs it is chosen where it is defined,
not here: the projections in kernels/linear.py (a GPU's matvec kernel takes the norm before it and the residual after it
into the kernel that streams W; `norm(x)` is therefore a lazy `Normed`), RoPE, the KV write and attention in
kernels/paged_attention.py (`rope` leaves the rotation to the kernel that reads q or K). With `kernels="reference"`
(`--kernels reference`) the same code runs on tinygrad's plain operations: what the fast kernels are tested against.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`), so a safetensors checkpoint loads
as is and a GGUF one after `gguf.gguf_to_hf_state_dict`.
"""
from __future__ import annotations
import math
import numpy as np
from tinygrad import Tensor, dtypes, nn
from tinyvllm.model.config import ModelConfig
from tinyvllm.kernels.linear import Normed, PackedLinear, RMSNorm, linear, use_kernels
from tinyvllm.kernels.paged_attention import BlockTables, attend, rope, store_kv
from tinyvllm.kernels.paged_attention import apply_rope  # noqa: F401  (diffusion/llada.py rotates with it too)
from tinyvllm.kernels.quantized import PackedWeight
from tinyvllm.tinygrad_internals import SameBody, to_device


class Linear(nn.Linear):
  """nn.Linear whose weights are placeholders until the loader fills them: nn.Linear's random initialisation would
  build a graph for every matrix only to throw it away (1.6 s of a CPU start for SmolLM2). Called as `proj(x)`,
  `proj(norm(x))` or `proj(x, residual=r)` (r + proj(x)): kernels/linear.py picks the kernel."""
  def __init__(self, in_features: int, out_features: int, bias: bool = True):
    self.weight = Tensor.empty(out_features, in_features)
    self.bias = Tensor.empty(out_features) if bias else None

  def __call__(self, x: Tensor | Normed, residual: Tensor | None = None) -> Tensor:
    return linear(x, self.weight, self.bias, residual=residual)


class Embedding(nn.Embedding):
  """nn.Embedding with a placeholder table, as Linear above."""
  def __init__(self, vocab_size: int, embed_size: int): self.weight = Tensor.empty(vocab_size, embed_size)


Projection = Linear | PackedLinear


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies of the rotary pairs, with Llama-3's long-context scaling when the checkpoint asks for it."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
  scaling = cfg.rope_scaling or {}
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "linear": inv_freq = inv_freq / scaling["factor"]     # positions divided by `factor` (Gemma 3 4B+)
  if kind == "llama3":
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    # long wavelengths are divided by `factor`, short ones kept, the band between blended smoothly
    inv_freq = np.where(wavelen > old_len / low, inv_freq / factor, (1 - smooth) * inv_freq / factor + smooth * inv_freq)
  return inv_freq


class Attention:
  def __init__(self, cfg: ModelConfig):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.window = cfg.sliding_window
    self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
    self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
    self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
    self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
    self.qkv_proj: Projection | None = None
    if cfg.qk_norm: self.q_norm, self.k_norm = (nn.RMSNorm(cfg.head_dim, cfg.rms_norm_eps) for _ in range(2))

  def fuse(self) -> None:
    self.qkv_proj = Linear(self.q_proj.weight.shape[1], (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                           bias=self.q_proj.bias is not None)
    del self.q_proj, self.k_proj, self.v_proj

  def __call__(self, x: Tensor, norm: nn.RMSNorm, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor],
               batch: ForwardBatch) -> Tensor:
    """x + attention(norm(x)) for the step's T tokens, x: [T, hidden] (norm(x): inside the projection's kernel)"""
    return self.o_proj(self.heads(norm(x), cos, sin, kv, batch), residual=x)     # x + o_proj(o)

  def heads(self, h: Tensor | Normed, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], batch: ForwardBatch) -> Tensor:
    """Each token's attention over its sequence's context, before the output projection: [T, H·D]"""
    q, k, v = self.qkv(h)                             # [T, H·D], [T, KVH·D], [T, KVH·D]
    if hasattr(self, "q_norm"): q, k = per_head(self.q_norm, q), per_head(self.k_norm, k)   # Qwen3's q/k norms
    q, k = rope(q, cos, sin), rope(k, cos, sin)       # RoPE: rotated by the kernels that read them
    kv = store_kv(kv, k, v, batch.slot_mapping)       # this step's K and V into the paged pool
    return attend(q, kv, batch, self.window)          # each token over its sequence's context

  def qkv(self, h: Tensor | Normed) -> list[Tensor]:
    """q_proj(h), k_proj(h), v_proj(h): one projection whose columns are [q | k | v], or three where tensor
    parallelism keeps them apart."""
    if self.qkv_proj is None: return [self.q_proj(h), self.k_proj(h), self.v_proj(h)]
    H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
    return self.qkv_proj(h).split([H * D, KVH * D, KVH * D], dim=-1)


def per_head(norm: nn.RMSNorm, x: Tensor) -> Tensor:
  """An RMSNorm over each head's dimensions of x [T, heads·head_dim]."""
  T, D = x.shape[0], norm.weight.shape[0]
  return norm(x.reshape(T, -1, D)).reshape(T, -1)


class MLP:
  def __init__(self, cfg: ModelConfig):
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
    self.gate_up_proj: Projection | None = None

  def fuse(self) -> None:
    N, K = self.gate_proj.weight.shape
    self.gate_up_proj = Linear(K, 2 * N, bias=False)
    del self.gate_proj, self.up_proj

  def __call__(self, x: Tensor, norm: nn.RMSNorm) -> Tensor:
    """x + mlp(norm(x)), the SwiGLU MLP: x + down(silu(gate(h)) * up(h)) (norm(x): inside the projection's kernel)"""
    return self.down_proj(self.gated(norm(x)), residual=x)                  # x + down(silu(gate) * up)

  def gated(self, h: Tensor | Normed) -> Tensor:
    """activation(gate(h)) * up(h): [T, intermediate]"""
    gate, up = self.gate_up(h)                        # [T, intermediate] each
    # materialized: fused into down_proj's matmul, the activation is re-read through the strided halves of gate_up
    # for every output tile (16 of a 33 ms batch-256 step on the H100, docs/performance.md)
    return (self.activation(gate) * up).contiguous()

  activation = staticmethod(Tensor.silu)            # GeGLU's gelu in Gemma 3 (gemma3.py)

  def gate_up(self, h: Tensor | Normed) -> list[Tensor]:
    """gate_proj(h), up_proj(h): one projection whose columns are [gate | up], or two."""
    if self.gate_up_proj is None: return [self.gate_proj(h), self.up_proj(h)]
    return self.gate_up_proj(h).chunk(2, dim=-1)


class DecoderLayer:
  def __init__(self, cfg: ModelConfig):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], batch: ForwardBatch) -> Tensor:
    x = self.self_attn(x, self.input_layernorm, cos, sin, kv, batch)     # x + attention(norm(x))
    return self.mlp(x, self.post_attention_layernorm).contiguous()       # x + mlp(norm(x))


class ForwardBatch:
  """The device-side description of one forward pass: T tokens, from any number of sequences (decoding rows and
  prompt chunks alike), and the R of them whose logits are wanted. Each token attends to its sequence's keys up to
  its *key limit*: its own position (causal, the default), or further, the end of a block that attends to itself
  both ways (a diffusion LM's block; its keys are written before the attention reads them)."""
  def __init__(self, tokens: Tensor, positions: Tensor, slot_mapping: Tensor, tables: BlockTables,
               logits_index: Tensor, paged: bool, key_limits: Tensor | None = None):
    self.tokens, self.positions, self.slot_mapping = tokens, positions, slot_mapping     # [T] each
    self.tables, self.logits_index = tables, logits_index                                # see BlockTables; [R]
    self.paged = paged    # attend straight from the pool (paged_attention) rather than from a dense copy per token
    self.key_limits = positions if key_limits is None else key_limits                   # [T]

  def for_layers(self) -> ForwardBatch:
    """What a decoder layer reads (not the token ids, not the logits index)."""
    return ForwardBatch(None, self.positions, self.slot_mapping, self.tables, None, self.paged, self.key_limits)


class LlamaModel:
  def __init__(self, cfg: ModelConfig):
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
    self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM:
  def __init__(self, cfg: ModelConfig):
    self.config = cfg
    self.model = LlamaModel(cfg)
    if not cfg.tie_word_embeddings: self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    angles = np.outer(np.arange(cfg.max_position_embeddings), rope_frequencies(cfg))
    self.rope_cos, self.rope_sin = to_device(np.cos(angles).astype(np.float32)), to_device(np.sin(angles).astype(np.float32))
    self.kernels = "fast"     # or "reference": tinygrad's plain operations throughout (kernels/linear.py)

  def fuse_projections(self) -> None:
    """Replace q/k/v and gate/up of every layer by one projection each, `qkv_proj` and `gate_up_proj`, before the
    weights are loaded: the loader stacks the checkpoint's matrices into them (loader.stack_checkpoint)."""
    for layer in self.model.layers:
      layer.self_attn.fuse()
      layer.mlp.fuse()

  def output_weight(self) -> Tensor | PackedWeight:
    return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

  def __call__(self, batch: ForwardBatch, kv_cache: list[tuple[Tensor, Tensor]], every_position: bool = False) -> Tensor:
    """Returns the logits of the tokens at `batch.logits_index`: [R, vocab]; with `every_position`, the logits of
    all T tokens (prompt logprobs need them): [T, vocab]."""
    with use_kernels(self.kernels): return self.forward(batch, kv_cache, every_position)

  def forward(self, batch: ForwardBatch, kv_cache: list[tuple[Tensor, Tensor]], every_position: bool) -> Tensor:
    x = self.layers(self.embed(batch.tokens), batch, kv_cache)                # [T, hidden]
    h = x if every_position else x.gather(0, batch.logits_index.reshape(-1, 1).expand(-1, x.shape[1]))
    return linear(self.model.norm(h), self.output_weight()).cast(dtypes.float32)      # lm_head(norm(h))

  def embed(self, tokens: Tensor) -> Tensor: return self.model.embed_tokens(tokens)

  def layers(self, x: Tensor, batch: ForwardBatch, kv_cache: list[tuple[Tensor, Tensor]]) -> Tensor:
    cos, sin = self.rope_cos[batch.positions].cast(x.dtype), self.rope_sin[batch.positions].cast(x.dtype)
    # every layer has the same body, only its weights and KV pool differ: traced once as a tinygrad function, so
    # tracing, scheduling and code generation happen once, not num_layers times (tinygrad_internals.py)
    run_layer, layer_batch = SameBody(DecoderLayer.__call__), batch.for_layers()
    for layer, kv in zip(self.model.layers, kv_cache): x = run_layer(layer, x, cos, sin, kv, layer_batch)
    return x
