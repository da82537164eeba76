"""Train the small LLaDA-architecture model that tinyvllm ships (tinyvllm/diffusion/llada-django).

The masked-diffusion objective (LLaDA, eq. 3): for each training window draw t ~ U(eps, 1), replace every token by
[MASK] with probability t, and train the network to predict the masked tokens from everything else (attention is
bidirectional). The loss is the cross-entropy on the masked positions weighted by 1/t, averaged over all positions:

    loss = E_t E_mask [ (1/t) · Σ_{i masked} -log p(x_i | x_masked) ] / T   ≥  -log p(x) / T

so it is an upper bound on the negative log-likelihood per token and can be set against the uniform (ln V) and
unigram baselines, which are per-token NLLs too.

Corpus: the Python source and tests of Django 5.1.4 (BSD licence; the PyPI sdist: 2,784 files, 17 MB, 5.3M tokens).
Code, not prose, because the point of this model is to show Fast-dLLM's parallel decoding, and that pays only where
the model is sure of several masked tokens at once: a first model trained on Shakespeare (1.7M tokens, validation
loss 3.53) committed ~1 token per step at Fast-dLLM's threshold of 0.9. Tokenizer: a 4,096-piece SentencePiece BPE
trained here, with newlines and runs of spaces (indentation) kept as pieces and LLaDA's mask token `<|mdm_mask|>` as
a control symbol.

Why PyTorch, in an engine built on tinygrad: this is a one-off job on a lent H100 with a few minutes to spend, and
tinygrad 0.14's training kernels ran 30-80x slower than torch's there (docs/performance.md): the
weight-gradient matmul [384, 16K] @ [16K, 1024] reached 5.9 TFLOP/s (28 with BEAM=2, after a minutes-long search)
against torch's 164 in fp32 and 301 in bf16, and a whole tinygrad step took 0.63 s. Serving stays tinygrad: the
network below is LLaDA's, written with LLaDA's own tensor names so its state dict *is* the checkpoint, and `check`
confirms that tinyvllm's MaskedDiffusionLM computes the same logits from the saved file. PyTorch is not a tinyvllm
dependency (the device image has it; elsewhere `pip install torch`).

    python examples/train_diffusion.py prepare --data .dlm          # download corpus (pip), tokenizer, tokens.npy
    python examples/train_diffusion.py train --data .dlm --out /tmp/a --time-budget 490 --int8 --shard-mb 15
                                                                    # the shipped model's first 490 s (one H100)
    python examples/train_diffusion.py train --data .dlm --out /tmp/b --init /tmp/a --lr 6e-4 --warmup 100 \
        --time-budget 490 --int8 --shard-mb 15                      # its second 490 s (val loss 2.25 -> 2.22)
    python examples/train_diffusion.py check --data .dlm --model /tmp/b   # torch vs tinyvllm logits, same file

The default shape (31.5M parameters: d 512, 8 layers, MLP 1536) is the smallest of those tried here that halved
the model calls at close quality: a 13.8M model (d 384, 6 layers) trained as long halved them only by losing 0.5
nats/token.
The checkpoint is LLaDA's Hugging Face layout (config.json with `architectures: ["LLaDAModelLM"]`,
`model.transformer.blocks.N.*` tensors, safetensors), so `LLM(model=<dir>)` loads it like GSAI-ML/LLaDA-8B; with
`--int8` the blocks' matrices are stored as int8 with a scale per row (36 MB instead of 63 in fp16).
During training the validation loss is measured every `--eval-every` seconds and the best model so far is saved: a
490 s run sees the corpus ~66 times (masked diffusion, unlike next-token training, keeps improving over many epochs).
"""
from __future__ import annotations
import argparse
import json
import math
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
import numpy as np
import sentencepiece as spm

MASK_TOKEN = "<|mdm_mask|>"
EPS = 1e-3                                                   # smallest masking ratio
DJANGO = "5.1.4"                                             # the corpus: its source and tests


# ---- data -------------------------------------------------------------------------------------------------------
def prepare(data: Path, vocab_size: int) -> None:
  data.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", f"django=={DJANGO}",
                    "-d", tmp], check=True)
    with tarfile.open(next(Path(tmp).glob(f"*jango-{DJANGO}.tar.gz"))) as tar: tar.extractall(tmp, filter="data")
    root = next(Path(tmp).glob(f"*jango-{DJANGO}"))
    files = sorted((root / "django").rglob("*.py")) + sorted((root / "tests").rglob("*.py"))
    # each file, its path first as a comment, so a prompt can ask for one
    text = "\n\n\n".join(f"# {f.relative_to(root)}\n" + f.read_text(encoding="utf-8", errors="replace").strip()
                          for f in files)
  (data / "corpus.txt").write_text(text, encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(data / "corpus.txt"), model_prefix=str(data / "tokenizer"),
                                 vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False,
                                 user_defined_symbols=["\n"], control_symbols=[MASK_TOKEN], max_sentence_length=1 << 20,
                                 split_by_whitespace=True, allow_whitespace_only_pieces=True,   # indentation
                                 input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=8,
                                 minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
  tokens = np.array(sp.encode(text), dtype=np.uint16)
  np.save(data / "tokens.npy", tokens)
  print(f"{len(files)} files, {len(text):,} characters -> {len(tokens):,} tokens (vocab {sp.get_piece_size()})")


def split(tokens: np.ndarray, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
  cut = int(len(tokens) * (1 - val_fraction))
  return tokens[:cut], tokens[cut:]


def noised_batch(tokens: np.ndarray, batch: int, seq: int, mask_id: int, rng: np.random.Generator,
                 starts: np.ndarray | None = None,
                 prompt_rows: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Windows of `seq` tokens, each with its own masking ratio t: (noised input, clean target, loss weight 1/t on
  masked positions, 0 elsewhere). A `prompt_rows` share of the windows keeps a prefix of random length unmasked, as
  LLaDA's fine-tuning keeps the prompt: the sampler always meets a clean prefix followed by masks, which i.i.d.
  masking alone rarely shows."""
  if starts is None: starts = rng.integers(0, len(tokens) - seq, batch)
  clean = np.stack([tokens[s:s + seq] for s in starts]).astype(np.int32)
  t = (1 - EPS) * rng.random((len(starts), 1)) + EPS
  masked = rng.random(clean.shape) < t
  prompt = (np.arange(seq) < rng.integers(0, seq, (len(starts), 1))) & (rng.random((len(starts), 1)) < prompt_rows)
  masked &= ~prompt
  return np.where(masked, mask_id, clean).astype(np.int32), clean, (masked / t).astype(np.float32)


# ---- the network (PyTorch, LLaDA's tensor names) -----------------------------------------------------------------
def llada_config(vocab: int, mask_id: int, eos_id: int, a: argparse.Namespace) -> dict:
  return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "activation_type": "silu",
          "layer_norm_type": "rms", "rope": True, "d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads,
          "n_kv_heads": a.heads, "mlp_hidden_size": a.mlp, "vocab_size": vocab, "embedding_size": vocab,
          "max_sequence_length": a.seq, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "weight_tying": False,
          "include_bias": False, "include_qkv_bias": False, "mask_token_id": mask_id, "eos_token_id": eos_id,
          "pad_token_id": eos_id, "bos_token_id": 1}


def build_network(config: dict):
  """LLaDA's network: Llama blocks, no causal mask. Module names follow LLaDA's checkpoint (`model.transformer.wte`,
  `blocks.N.q_proj`, `attn_out`, `ff_proj` (gate), `up_proj`, `ff_out` (down), `ln_f`, `ff_out` (head))."""
  import torch
  from torch import nn
  import torch.nn.functional as F
  d, heads, eps = config["d_model"], config["n_heads"], config["rms_norm_eps"]
  head_dim = d // heads

  def rope(x, cos, sin):                                     # x [B, heads, T, head_dim]; rotate the two halves
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attn_norm, self.ff_norm = nn.RMSNorm(d, eps=eps), nn.RMSNorm(d, eps=eps)
      self.q_proj, self.k_proj, self.v_proj, self.attn_out = (nn.Linear(d, d, bias=False) for _ in range(4))
      self.ff_proj, self.up_proj = (nn.Linear(d, config["mlp_hidden_size"], bias=False) for _ in range(2))
      self.ff_out = nn.Linear(config["mlp_hidden_size"], d, bias=False)

    def forward(self, x, cos, sin):
      B, T, _ = x.shape
      h = self.attn_norm(x)
      q, k, v = (p(h).view(B, T, heads, head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
      attn = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v)     # every position sees all
      x = x + self.attn_out(attn.transpose(1, 2).reshape(B, T, d))
      h = self.ff_norm(x)
      return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

  class LLaDA(nn.Module):
    def __init__(self):
      super().__init__()
      self.model = nn.Module()
      self.model.transformer = nn.ModuleDict(dict(
        wte=nn.Embedding(config["embedding_size"], d), blocks=nn.ModuleList(Block() for _ in range(config["n_layers"])),
        ln_f=nn.RMSNorm(d, eps=eps), ff_out=nn.Linear(d, config["embedding_size"], bias=False)))

    def forward(self, tokens):
      t = self.model.transformer
      inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, head_dim, 2, device=tokens.device) / head_dim)
      angles = torch.outer(torch.arange(tokens.shape[1], device=tokens.device), inv_freq)
      x = t.wte(tokens)
      for block in t.blocks: x = block(x, angles.cos(), angles.sin())
      return t.ff_out(t.ln_f(x))

  return LLaDA()


# ---- training -----------------------------------------------------------------------------------------------------
class Trainer:
  """The network, its optimizer and the masked loss on one device (bf16 autocast on a GPU)."""
  def __init__(self, config: dict, a: argparse.Namespace):
    import torch
    self.torch = torch
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    self.net = build_network(config).to(self.device)
    with torch.no_grad():                                    # norms 1, matrices N(0, 1/fan_in)
      for name, p in self.net.named_parameters():
        if "norm" in name or name.endswith("ln_f.weight"): p.fill_(1.0)
        else: p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
    if a.init: self.net.load_state_dict(read_weights(a.init, torch))
    self.opt = torch.optim.AdamW(self.net.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    self.compiled = torch.compile(self.net) if self.device.type == "cuda" else self.net

  def loss(self, noised: np.ndarray, clean: np.ndarray, weight: np.ndarray, net=None):
    torch = self.torch
    noised, clean, weight = (torch.from_numpy(x).to(self.device, non_blocking=True) for x in (noised, clean, weight))
    with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
      logits = (net or self.compiled)(noised.long())
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), clean.long().flatten(), reduction="none")
    return (nll * weight.flatten()).sum() / weight.numel()

  def step(self, batch: tuple[np.ndarray, np.ndarray, np.ndarray], lr: float):
    for group in self.opt.param_groups: group["lr"] = lr
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(*batch)
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
    self.opt.step()
    return loss

  def evaluate(self, val: np.ndarray, mask_id: int, batch: int, seq: int, windows: int) -> float:
    """The 1/t-weighted masked loss on fixed validation windows and masks (nats per token)."""
    rng = np.random.default_rng(1234)
    starts = np.linspace(0, len(val) - seq - 1, windows).astype(np.int64)
    self.net.eval()
    with self.torch.no_grad():
      losses = [self.loss(*noised_batch(val, batch, seq, mask_id, rng, starts[i:i + batch]), net=self.net).item()
                for i in range(0, windows - windows % batch, batch)]
    self.net.train()
    return float(np.mean(losses))

  def weights(self) -> dict[str, np.ndarray]:
    return {name: p.detach().float().cpu().numpy().astype(np.float16) for name, p in self.net.state_dict().items()}


def baselines(train: np.ndarray, val: np.ndarray, vocab: int) -> dict[str, float]:
  counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1
  unigram = -np.log(counts / counts.sum())[val].mean()
  return {"uniform": math.log(vocab), "unigram": float(unigram)}


def int8_rows(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each matrix of the blocks as int8 with one scale per row, `<name>_scale` (the compressed-tensors W8A16 layout,
  which tinyvllm's loader dequantizes): half the bytes of fp16 for a rounding error of at most 1/254 of the row's
  largest weight. The embedding and the output head stay fp16: the head's errors would land on the logits unmixed."""
  out = {}
  for name, w in weights.items():
    if w.ndim != 2 or ".blocks." not in name: out[name] = w; continue
    scale = np.maximum(np.abs(w.astype(np.float32)).max(axis=1, keepdims=True), 1e-8) / 127
    out[name], out[name + "_scale"] = np.round(w / scale).astype(np.int8), scale.astype(np.float32)
  return out


def save(weights: dict[str, np.ndarray], config: dict, data: Path, out: Path, shard_mb: float | None = None,
         int8: bool = False) -> None:
  """The checkpoint in LLaDA's layout; with shard_mb, split into Hugging Face shards plus their index."""
  from safetensors.numpy import save_file
  out.mkdir(parents=True, exist_ok=True)
  if int8: weights = int8_rows(weights)
  shards: list[dict[str, np.ndarray]] = [{}]
  for name, w in weights.items():
    if shard_mb and shards[-1] and sum(x.nbytes for x in shards[-1].values()) + w.nbytes > shard_mb * 2**20:
      shards.append({})
    shards[-1][name] = w
  names = ["model.safetensors"] if len(shards) == 1 else \
    [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards): save_file(shard, str(out / name))
  if len(shards) > 1:
    index = {"weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  shutil.copy(data / "tokenizer.model", out / "tokenizer.model")
  tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "mask_token": MASK_TOKEN,
                      "add_bos_token": False}                   # the windows it was trained on carry no <s>
  (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def train(a: argparse.Namespace) -> None:
  sp = spm.SentencePieceProcessor(model_file=str(a.data / "tokenizer.model"))
  vocab, mask_id = sp.get_piece_size(), sp.piece_to_id(MASK_TOKEN)
  train_tokens, val_tokens = split(np.load(a.data / "tokens.npy"))
  config = llada_config(vocab, mask_id, sp.eos_id(), a)
  trainer = Trainer(config, a)
  params = sum(p.numel() for p in trainer.net.parameters())
  print(f"{params / 1e6:.2f}M parameters, {len(train_tokens):,} train tokens, on {trainer.device}", flush=True)
  rng, history, best = np.random.default_rng(a.seed), [], {"val_loss": math.inf}

  def evaluate_and_keep_best(n: int) -> None:
    val = trainer.evaluate(val_tokens, mask_id, a.batch, a.seq, a.val_windows)
    history.append({"step": n, "seconds": round(time.monotonic() - t0, 1), "val_loss": round(val, 4)})
    print(f"step {n}: val loss {val:.3f}{' (best so far: saved)' if val < best['val_loss'] else ''}", flush=True)
    if val < best["val_loss"]:
      best.update(val_loss=val, step=n)
      save(trainer.weights(), config, a.data, a.out, a.shard_mb, a.int8)

  n, t0 = 0, time.monotonic()
  last_eval = t0
  while (frac := (time.monotonic() - t0) / a.time_budget) < 1:
    lr = a.lr * min(1.0, (n + 1) / a.warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))   # warm up, cosine to 10%
    loss = trainer.step(noised_batch(train_tokens, a.batch, a.seq, mask_id, rng, prompt_rows=a.prompt_rows), lr)
    n += 1
    if n in (1, 10) or n % 500 == 0: print(f"step {n} {time.monotonic() - t0:.1f}s loss {loss.item():.3f}", flush=True)
    if time.monotonic() - last_eval > a.eval_every:
      evaluate_and_keep_best(n)
      last_eval = time.monotonic()
  evaluate_and_keep_best(n)
  metrics = {"steps": n, "saved_step": best["step"], "train_seconds": round(time.monotonic() - t0, 1),
             "tokens_seen": n * a.batch * a.seq, "epochs": round(n * a.batch * a.seq / len(train_tokens), 1),
             "val_loss": best["val_loss"], **baselines(train_tokens, val_tokens, vocab), "history": history}
  (a.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  print(json.dumps({k: v for k, v in metrics.items() if k != "history"}), flush=True)


def read_weights(path: Path, torch) -> dict:
  from tinyvllm.model.loader import read_safetensors
  return {name: torch.from_numpy(w.astype(np.float32)) for name, w in read_safetensors(path).items()}


def check(a: argparse.Namespace) -> None:
  """Logits of the saved checkpoint by this file's network (torch, fp32) and by tinyvllm's (tinygrad): the largest
  difference, on validation windows with a masking ratio of 0.5."""
  import torch
  from tinygrad import Tensor
  from tinyvllm.diffusion.llada import load_diffusion_model
  config = json.loads((a.model / "config.json").read_text())
  net = build_network(config)
  net.load_state_dict(read_weights(a.model, torch))
  rng = np.random.default_rng(0)
  tokens = split(np.load(a.data / "tokens.npy"))[1]
  noised = noised_batch(tokens, 4, 128, config["mask_token_id"], rng)[0]
  with torch.no_grad(): ours = net(torch.from_numpy(noised).long()).numpy()
  theirs = load_diffusion_model(a.model)[0](Tensor(noised)).numpy()
  diff = np.abs(ours - theirs).max()
  print(f"max |torch - tinyvllm| logit difference: {diff:.2e} (logits span {ours.min():.1f}..{ours.max():.1f})")
  if diff > 1e-2: sys.exit(1)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("prepare")
  p.add_argument("--data", type=Path, required=True)
  p.add_argument("--vocab", type=int, default=4096)
  t = sub.add_parser("train")
  t.add_argument("--data", type=Path, required=True)
  t.add_argument("--out", type=Path, required=True)
  t.add_argument("--init", type=Path, default=None, help="warm start from this checkpoint's weights (same shape)")
  t.add_argument("--prompt-rows", type=float, default=0.5, help="share of windows that keep a clean prefix")
  t.add_argument("--time-budget", type=float, default=420.0, help="seconds of training (the LR schedule spans it)")
  t.add_argument("--d-model", type=int, default=512)
  t.add_argument("--layers", type=int, default=8)
  t.add_argument("--heads", type=int, default=8)
  t.add_argument("--mlp", type=int, default=1536)
  t.add_argument("--seq", type=int, default=256)
  t.add_argument("--batch", type=int, default=64)
  t.add_argument("--lr", type=float, default=1e-3)
  t.add_argument("--warmup", type=int, default=200)
  t.add_argument("--eval-every", type=float, default=45.0, help="seconds between validation runs (best is saved)")
  t.add_argument("--val-windows", type=int, default=512)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--shard-mb", type=float, default=None, help="split the weights into shards of at most this size")
  t.add_argument("--int8", action="store_true", help="store matrices as int8 with a scale per row (half of fp16)")
  c = sub.add_parser("check")
  c.add_argument("--data", type=Path, required=True)
  c.add_argument("--model", type=Path, required=True)
  a = ap.parse_args()
  {"prepare": lambda: prepare(a.data, a.vocab), "train": lambda: train(a), "check": lambda: check(a)}[a.cmd]()


if __name__ == "__main__":
  main()
