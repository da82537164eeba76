"""Fast-dLLM's prefix-cache loop in plain torch, as the `bench.py diffusion` peer (needs torch; a GPU to mean much).

Reads a JSON spec on stdin and prints one JSON line on stdout:
  {"config": {Llama shape}, "prompts": [[ids]] (equal lengths), "gen_length", "block_length", "steps", "mask_id",
   "dtype": "float16", "device": "cuda"}
  → {"duration", "forward_passes", "num_requests", "output_tokens"}
The network is LLaDA's: a Llama (RMSNorm, RoPE, SwiGLU) whose attention sees both sides (no causal mask), random
weights of the shape, `F.scaled_dot_product_attention` (flash attention where the GPU has it). The loop is
Fast-dLLM's `generate_with_prefix_cache`, all prompts in one batch: at each block's first step the whole sequence runs
and the keys/values before the block are kept; the block's other steps run the block and everything after it
against that prefix. Every step commits a fixed number of the block's masked positions, the most confident
(LLaDA's low-confidence remasking, greedy); one warm-up run of the same shapes comes first.
"""
import json
import sys
import time
import torch
import torch.nn.functional as F


class Llama:
  def __init__(self, cfg: dict, dtype: torch.dtype, device: torch.device):
    H, I, self.eps = cfg["hidden_size"], cfg["intermediate_size"], cfg.get("rms_norm_eps", 1e-5)
    self.heads, self.kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    self.head_dim = H // self.heads
    w = lambda *shape: torch.randn(*shape, dtype=dtype, device=device) * 0.02
    ones = lambda n: torch.ones(n, dtype=dtype, device=device)
    kv = self.kv_heads * self.head_dim
    self.embed, self.norm, self.lm_head = w(cfg["vocab_size"], H), ones(H), w(cfg["vocab_size"], H)
    self.layers = [dict(attn_norm=ones(H), q=w(H, H), k=w(kv, H), v=w(kv, H), o=w(H, H), mlp_norm=ones(H),
                        gate=w(I, H), up=w(I, H), down=w(H, I)) for _ in range(cfg["num_hidden_layers"])]
    inv = 1.0 / cfg.get("rope_theta", 10000.0) ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim)
    angles = torch.outer(torch.arange(cfg.get("max_position_embeddings", 4096), device=device).float(), inv)
    self.cos, self.sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)

  def rms(self, x, weight):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * weight

  def rope(self, x, start: int):
    cos, sin = self.cos[start:start + x.shape[2]], self.sin[start:start + x.shape[2]]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

  def __call__(self, ids: torch.Tensor, prefix: list | None):
    """ids [B, L] at positions start.. (start = the prefix's length) -> (hidden [B, L, H], each layer's (k, v) of
    prefix + ids)."""
    B, L = ids.shape
    start = 0 if prefix is None else prefix[0][0].shape[2]
    x, kvs = self.embed[ids], []
    for i, layer in enumerate(self.layers):
      h = self.rms(x, layer["attn_norm"])
      q = self.rope(F.linear(h, layer["q"]).view(B, L, self.heads, -1).transpose(1, 2), start)
      k = self.rope(F.linear(h, layer["k"]).view(B, L, self.kv_heads, -1).transpose(1, 2), start)
      v = F.linear(h, layer["v"]).view(B, L, self.kv_heads, -1).transpose(1, 2)
      if prefix is not None: k, v = torch.cat([prefix[i][0], k], 2), torch.cat([prefix[i][1], v], 2)
      kvs.append((k, v))
      group = self.heads // self.kv_heads
      if group > 1: k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
      attn = F.scaled_dot_product_attention(q, k, v, is_causal=False)           # both sides: a diffusion LM
      x = x + F.linear(attn.transpose(1, 2).reshape(B, L, -1), layer["o"])
      h = self.rms(x, layer["mlp_norm"])
      x = x + F.linear(F.silu(F.linear(h, layer["gate"])) * F.linear(h, layer["up"]), layer["down"])
    return self.rms(x, self.norm), kvs


def commit(model: Llama, x: torch.Tensor, hidden: torch.Tensor, start: int, count: int, mask_id: int) -> None:
  """Commit the `count` most confident masked positions of each row's block (hidden: the block's states)."""
  probs = F.softmax(F.linear(hidden, model.lm_head).float(), -1)
  confidence, predicted = probs.max(-1)
  block = x[:, start:start + hidden.shape[1]]
  confidence = torch.where(block == mask_id, confidence, -torch.inf)
  chosen = confidence.topk(count, -1).indices
  block.scatter_(1, chosen, predicted.gather(1, chosen))


@torch.inference_mode()
def generate(model: Llama, prompts: torch.Tensor, spec: dict) -> int:
  """Fast-dLLM's prefix-cache loop; the number of batched forward passes."""
  mask_id, gen, block = spec["mask_id"], spec["gen_length"], spec["block_length"]
  blocks, P = gen // block, prompts.shape[1]
  per_block = spec["steps"] // blocks
  base, extra = divmod(block, per_block)
  schedule = [base + (i < extra) for i in range(per_block)]
  x = torch.cat([prompts, torch.full((prompts.shape[0], gen), mask_id, device=prompts.device)], 1)
  passes = 0
  for b in range(blocks):
    start = P + b * block
    hidden, kvs = model(x, None)                                  # the whole sequence; keep the prefix's K/V
    commit(model, x, hidden[:, start:start + block], start, schedule[0], mask_id)
    prefix, passes = [(k[:, :, :start], v[:, :, :start]) for k, v in kvs], passes + 1
    for count in schedule[1:]:
      hidden, _ = model(x[:, start:], prefix)                     # the block and the masks after it
      commit(model, x, hidden[:, :block], start, count, mask_id)
      passes += 1
  return passes


def main() -> None:
  spec = json.load(sys.stdin)
  device = torch.device(spec["device"])
  model = Llama(spec["config"], getattr(torch, spec["dtype"]), device)
  prompts = torch.tensor(spec["prompts"], device=device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  generate(model, prompts, spec)                                 # warm-up: the same shapes
  sync()
  start = time.perf_counter()
  passes = generate(model, prompts, spec)
  sync()
  print(json.dumps({"duration": time.perf_counter() - start, "forward_passes": passes,
                    "num_requests": len(spec["prompts"]), "output_tokens": len(spec["prompts"]) * spec["gen_length"]}))


if __name__ == "__main__": main()
