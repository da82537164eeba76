"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in tinygrad, reading its K/V from a paged pool.

    tokens ─ embed ─┬─────────────────────────────┬──────────────────────────────┬─ ... ─ norm ─ lm_head ─ logits
                    └ RMSNorm ─ attention ─ (+) ──┴─ RMSNorm ─ SwiGLU MLP ─ (+) ─┘   × num_layers

- RMSNorm rescales each vector to unit root-mean-square, then by a learned gain (no mean subtraction, no bias).
- RoPE encodes a token's position by rotating pairs of query/key features by position-dependent angles, so the dot
  product q·k depends only on the distance between the two tokens. Pairs are (i, i + head_dim/2) as in Hugging Face.
  Llama-3 checkpoints stretch the low frequencies (`rope_scaling`) to reach longer contexts.
- Grouped-query attention (GQA): several query heads share one K/V head, shrinking the KV cache by that factor.
- SwiGLU: down(silu(gate(x)) * up(x)).
- q/k/v and gate/up are each one projection (`fuse_projections`; the loader stacks their matrices): one matmul
  kernel reads x once instead of three or two times. A model split across devices (tensor_parallel.py) stays unfused.

Parameter names follow Hugging Face (`model.layers.0.self_attn.q_proj.weight`), so a safetensors checkpoint loads
as is and a GGUF one after `gguf.gguf_to_hf_state_dict`.
"""
from __future__ import annotations
import math
import numpy as np
from tinygrad import Tensor, dtypes, nn
from tinygrad.nn import RMSNorm
from tinyvllm.model.config import ModelConfig
from tinyvllm.capture import SameBody
from tinyvllm.model.paged_attention import BlockTables, NewKV, write, write_and_gather, attention, paged_attention
from tinyvllm.model.linear import linear
from tinyvllm.model.quantized import PackedLinear, PackedWeight, matmul_t
from tinyvllm.transfer import to_device


class Linear(nn.Linear):
  """nn.Linear whose weights are placeholders until the loader fills them: nn.Linear's random initialisation would
  build a graph for every matrix only to throw it away (1.6 s of a CPU start for SmolLM2)."""
  def __init__(self, in_features: int, out_features: int, bias: bool = True):
    self.weight = Tensor.empty(out_features, in_features)
    self.bias = Tensor.empty(out_features) if bias else None


class Embedding(nn.Embedding):
  """nn.Embedding with a placeholder table, as Linear above."""
  def __init__(self, vocab_size: int, embed_size: int): self.weight = Tensor.empty(vocab_size, embed_size)


Projection = Linear | PackedLinear


def project(proj: Projection, x: Tensor, norm: RMSNorm | None = None, residual: Tensor | None = None) -> Tensor:
  """norm(x) @ proj.weight.T + bias (+ residual): the norm and the residual travel with the projection, so that a
  one-row projection on a GPU runs as one kernel that streams the weight (linear.py)."""
  if isinstance(proj, Linear): return linear(x, proj.weight, proj.bias, norm, residual)
  y = proj(x if norm is None else norm(x))
  return y if residual is None else residual + y


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies of the rotary pairs, with Llama-3's long-context scaling when the checkpoint asks for it."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
  scaling = cfg.rope_scaling or {}
  if scaling.get("rope_type", scaling.get("type")) == "llama3":
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    # long wavelengths are divided by `factor`, short ones kept, the band between blended smoothly
    inv_freq = np.where(wavelen > old_len / low, inv_freq / factor, (1 - smooth) * inv_freq / factor + smooth * inv_freq)
  return inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
  """x: [T, heads, head_dim]; cos/sin: [T, head_dim/2]."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
  return (x1 * cos - x2 * sin).cat(x2 * cos + x1 * sin, dim=-1)


class Attention:
  def __init__(self, cfg: ModelConfig):
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
    self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
    self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
    self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
    self.qkv_proj: Projection | None = None

  def fuse(self) -> None:
    self.qkv_proj = Linear(self.q_proj.weight.shape[1], (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                           bias=self.q_proj.bias is not None)
    del self.q_proj, self.k_proj, self.v_proj

  def __call__(self, x: Tensor, norm: RMSNorm, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor],
               batch: "ForwardBatch") -> Tensor:
    """x + attention(norm(x)) for the step's T tokens, x: [T, hidden]"""
    T, _ = x.shape
    H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
    if self.qkv_proj is None:
      q, k, v = (project(proj, x, norm) for proj in (self.q_proj, self.k_proj, self.v_proj))
      new = NewKV(k, v, 0, 0, cos, sin)
    else:
      q = qkv = project(self.qkv_proj, x, norm)                         # [T, (H + 2 KVH) D]; q is its first H D
      new = NewKV(qkv, qkv, H * D, (H + KVH) * D, cos, sin)
    if batch.paged:
      kv = write(kv, new, batch.slot_mapping)
      out = paged_attention(q, cos, sin, kv, batch.tables, batch.positions, H)
    else:
      k_ctx, v_ctx = write_and_gather(kv, new, batch.slot_mapping, batch.tables)
      q = apply_rope(q[:, :H * D].reshape(T, H, D), cos, sin)
      out = attention(q.reshape(T, 1, H, D), k_ctx, v_ctx, batch.positions.reshape(T, 1))
    return project(self.o_proj, out.reshape(T, -1), residual=x)


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

  def __call__(self, x: Tensor, norm: RMSNorm) -> Tensor:
    """x + mlp(norm(x))"""
    if self.gate_up_proj is None: gate, up = project(self.gate_proj, x, norm), project(self.up_proj, x, norm)
    else: gate, up = project(self.gate_up_proj, x, norm).chunk(2, dim=-1)
    # materialized: fused into down_proj's matmul, the activation is re-read through the strided halves of gate_up
    # for every output tile (16 of a 33 ms batch-256 step on the H100, docs/performance.md)
    return project(self.down_proj, (gate.silu() * up).contiguous(), residual=x)


class DecoderLayer:
  def __init__(self, cfg: ModelConfig):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = MLP(cfg)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], batch: "ForwardBatch") -> Tensor:
    h = self.self_attn(x, self.input_layernorm, cos, sin, kv, batch)
    return self.mlp(h, self.post_attention_layernorm).contiguous()


class ForwardBatch:
  """The device-side description of one forward pass: T tokens, from any number of sequences (decoding rows and
  prompt chunks alike), and the R of them whose logits are wanted."""
  def __init__(self, tokens: Tensor, positions: Tensor, slot_mapping: Tensor, tables: BlockTables,
               logits_index: Tensor, paged: bool):
    self.tokens, self.positions, self.slot_mapping = tokens, positions, slot_mapping     # [T] each
    self.tables, self.logits_index = tables, logits_index                                # see BlockTables; [R]
    self.paged = paged    # attend straight from the pool (paged_attention) rather than from a dense copy per token

  def for_layers(self) -> ForwardBatch:
    """What a decoder layer reads (not the token ids, not the logits index)."""
    return ForwardBatch(None, self.positions, self.slot_mapping, self.tables, None, self.paged)


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
    x = self.model.embed_tokens(batch.tokens)                                  # [T, hidden]
    dtype = x.dtype
    cos, sin = self.rope_cos[batch.positions].cast(dtype), self.rope_sin[batch.positions].cast(dtype)
    # every layer has the same body, only its weights and KV pool differ: traced once as a tinygrad function, so
    # tracing, scheduling and code generation happen once, not num_layers times (capture.py)
    run_layer, layer_batch = SameBody(DecoderLayer.__call__), batch.for_layers()
    for layer, kv in zip(self.model.layers, kv_cache): x = run_layer(layer, x, cos, sin, kv, layer_batch)
    h = x if every_position else x.gather(0, batch.logits_index.reshape(-1, 1).expand(-1, x.shape[1]))
    weight = self.output_weight()
    if isinstance(weight, PackedWeight): return matmul_t(self.model.norm(h), weight).cast(dtypes.float32)
    return linear(h, weight, norm=self.model.norm).cast(dtypes.float32)
