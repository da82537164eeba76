"""Gemma 3 (text): the Llama decoder of llama.py with five changes, each a few lines here.

    tokens ─ embed · √hidden ─┬──────────────────────────────────────────┬─ (the MLP the same way) ─ ... ─ norm ─ lm_head
                              └ RMSNorm ─ attention ─ RMSNorm ─ (+) ──────┘

- "Sandwich" norms: each sub-block's output is RMS-normalized too before it joins the residual stream, so a layer
  has four norms (input, post-attention, pre-feedforward, post-feedforward) instead of two.
- GeGLU: down(gelu(gate(x)) · up(x)), gelu in its tanh form, where Llama has SwiGLU.
- The embedding is scaled by √hidden_size on the way in (the tied output projection reads the table unscaled).
- Local and global layers: five of every six layers attend within a sliding window (512 tokens for the small models)
  and rotate with RoPE base 10,000; every sixth sees the whole context with base 1,000,000. The two kinds differ in
  a Python constant (the window), so each kind is traced as its own tinygrad function.
- q/k norms as Qwen3 (llama.py), and RMSNorm gains of 1 + w where checkpoints store w: the loader adds the 1
  (`as_gains`), so the fast kernels take Gemma's norms exactly as they take Llama's.

Every position's K and V stay in the paged pool, the local layers' too: the window masks what a local layer reads,
it does not free the blocks behind it (one pool layout for all layers; a 270M model's KV is small).
"""
from __future__ import annotations
import math
from dataclasses import replace
import numpy as np
from tinygrad import Tensor, nn
from tinyvllm.model.config import ModelConfig
from tinyvllm.kernels.linear import RMSNorm
from tinyvllm.model.llama import MLP, Attention, ForwardBatch, LlamaForCausalLM, rope_frequencies
from tinyvllm.tinygrad_internals import SameBody, to_device


class GeGLU(MLP):
  activation = staticmethod(Tensor.gelu)        # tinygrad's gelu is the tanh approximation, as Gemma's


class Gemma3DecoderLayer:
  def __init__(self, cfg: ModelConfig, sliding: bool):
    self.sliding = sliding
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.self_attn = Attention(cfg)
    self.self_attn.window = cfg.sliding_window if sliding else None
    self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)   # computed: its output is added
    self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.mlp = GeGLU(cfg)
    self.post_feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

  def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], batch: ForwardBatch) -> Tensor:
    attn, mlp = self.self_attn, self.mlp
    o = attn.o_proj(attn.heads(self.input_layernorm(x), cos, sin, kv, batch))
    x = x + self.post_attention_layernorm(o)                                    # x + norm(attention(norm(x)))
    y = mlp.down_proj(mlp.gated(self.pre_feedforward_layernorm(x)))
    return (x + self.post_feedforward_layernorm(y)).contiguous()                # x + norm(mlp(norm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
  def __init__(self, cfg: ModelConfig):
    super().__init__(cfg)
    self.model.layers = [Gemma3DecoderLayer(cfg, kind == "sliding_attention") for kind in cfg.layer_types]
    local = replace(cfg, rope_theta=cfg.rope_local_base_freq, rope_scaling=None)   # the local layers' rotation
    angles = np.outer(np.arange(cfg.max_position_embeddings), rope_frequencies(local))
    self.rope_local_cos, self.rope_local_sin = (to_device(f(angles).astype(np.float32)) for f in (np.cos, np.sin))

  def embed(self, tokens: Tensor) -> Tensor: return self.model.embed_tokens(tokens) * math.sqrt(self.config.hidden_size)

  def layers(self, x: Tensor, batch: ForwardBatch, kv_cache: list[tuple[Tensor, Tensor]]) -> Tensor:
    at = lambda table: table[batch.positions].cast(x.dtype)
    rotations = {False: (at(self.rope_cos), at(self.rope_sin)), True: (at(self.rope_local_cos), at(self.rope_local_sin))}
    bodies = {sliding: SameBody(Gemma3DecoderLayer.__call__) for sliding in (False, True)}   # one per kind of layer
    layer_batch = batch.for_layers()
    for layer, kv in zip(self.model.layers, kv_cache):
      x = bodies[layer.sliding](layer, x, *rotations[layer.sliding], kv, layer_batch)
    return x


def as_gains(weights: dict, cfg: ModelConfig) -> dict:
  """A checkpoint's Gemma norms (w, applied as x · (1 + w)) as the gains RMSNorm multiplies by: 1 + w. The query
  scale 1/√query_pre_attn_scalar, where it differs from attention's 1/√head_dim, goes into q_norm's gains."""
  q_scale = math.sqrt(cfg.head_dim / (cfg.query_pre_attn_scalar or cfg.head_dim))
  gains = {name: np.float32(1) + np.asarray(w, np.float32) for name, w in weights.items() if name.endswith("norm.weight")}
  for name in (n for n in gains if n.endswith("q_norm.weight") and q_scale != 1): gains[name] *= np.float32(q_scale)
  return weights | gains
