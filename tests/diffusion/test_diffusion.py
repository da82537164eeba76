"""Diffusion LMs: LLaDA's checkpoint layout, the sampler against straightforward reference loops, the batched engine,
Fast-dLLM's threshold decoding and prefix cache, and the shipped trained model."""
import re
import shutil
import numpy as np
import pytest
from tinygrad import Tensor, dtypes
from tinyvllm.benchmarks.diffusion import log_likelihood
from tinyvllm.engine_args import EngineArgs
from tinyvllm.diffusion.sampler import Denoiser, DiffusionParams, denoise_step, generate
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine.protocol import Engine
from tinyvllm.diffusion.llada import MaskedDiffusionLM, is_diffusion_checkpoint, load_diffusion_model, wants_diffusion
from tinyvllm.model.loader import DJANGO_DIFFUSION_MODEL
from tinyvllm.sampling_params import SamplingParams

from tiny_llada import MASK, TINY, VOCAB, llada_tensors, write_tiny_llada    # tests/diffusion: the tiny checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory): return write_tiny_llada(tmp_path_factory.mktemp("tiny-llada"))


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> MaskedDiffusionLM: return load_diffusion_model(tiny_dir)[0]


def numpy_llada(w: dict[str, np.ndarray], cfg: dict, tokens: list[int]) -> np.ndarray:
  """LLaDA's forward pass written from its tensor names alone (no tinyvllm code): logits [T, V]."""
  T, h, kvh = len(tokens), cfg["n_heads"], cfg["n_kv_heads"]
  hd = cfg["d_model"] // h
  rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg["rms_norm_eps"]) * g
  ang = np.outer(np.arange(T), 1 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))[:, None]
  rope = lambda q: np.concatenate([q[..., :hd // 2] * np.cos(ang) - q[..., hd // 2:] * np.sin(ang),
                                   q[..., hd // 2:] * np.cos(ang) + q[..., :hd // 2] * np.sin(ang)], -1)
  x = w["model.transformer.wte.weight"][tokens].astype(np.float64)
  for i in range(cfg["n_layers"]):
    b = lambda n: w[f"model.transformer.blocks.{i}.{n}"]
    a = rms(x, b("attn_norm.weight"))
    q = rope((a @ b("q_proj.weight").T).reshape(T, h, hd))
    k = np.repeat(rope((a @ b("k_proj.weight").T).reshape(T, kvh, hd)), h // kvh, axis=1)
    v = np.repeat((a @ b("v_proj.weight").T).reshape(T, kvh, hd), h // kvh, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)                 # no causal mask
    p = np.exp(s - s.max(-1, keepdims=True))
    x = x + np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(T, -1) @ b("attn_out.weight").T
    f = rms(x, b("ff_norm.weight"))
    gate = f @ b("ff_proj.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * (f @ b("up_proj.weight").T)) @ b("ff_out.weight").T
  return rms(x, w["model.transformer.ln_f.weight"]) @ w["model.transformer.ff_out.weight"].T


def test_llada_layout_loads_and_matches_numpy(tiny_dir, tiny):
  assert is_diffusion_checkpoint(tiny_dir) and wants_diffusion(str(tiny_dir)) and wants_diffusion("diffusion")
  tokens = [5, 17, MASK, 99, MASK, 1000, 7]
  ours = tiny(Tensor([tokens])).numpy()[0]
  ref = numpy_llada(llada_tensors(TINY), TINY, tokens)
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_int8_matrices_with_row_scales_load_dequantized(tiny_dir, tmp_path):
  """The shipped model stores its block matrices as int8 plus `<name>_scale` (compressed-tensors' W8A16 layout),
  written here independently of the trainer's writer."""
  from safetensors.numpy import save_file
  weights, stored = llada_tensors(TINY, seed=1), {}
  for name, w in weights.items():
    if ".blocks." in name and w.ndim == 2:
      scale = np.abs(w).max(axis=1, keepdims=True) / 127
      stored[name], stored[name + "_scale"] = np.round(w / scale).astype(np.int8), scale
      weights[name] = stored[name].astype(np.float32) * scale                  # what the loader must rebuild
    else: stored[name] = w
  for name in ("config.json", "tokenizer.model", "tokenizer_config.json"): shutil.copy(tiny_dir / name, tmp_path / name)
  save_file(stored, str(tmp_path / "model.safetensors"))
  tokens = [5, 17, MASK, 99, MASK, 1000, 7]
  ours = load_diffusion_model(tmp_path)[0](Tensor([tokens])).numpy()[0]
  ref = numpy_llada(weights, TINY, tokens)
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def reference_generate(model: MaskedDiffusionLM, prompt: list[int], p: DiffusionParams, use_cache: bool = False):
  """LLaDA's generate.py (and Fast-dLLM's threshold and prefix cache) as one plain loop over one sequence; returns
  the tokens after every step. Random numbers are drawn as the sampler does: [block_length, V] Gumbel uniforms when
  temperature > 0, then [block_length] uniforms for random remasking."""
  rng, P, shift, L = np.random.default_rng(p.seed), len(prompt), model.config.shift, p.block_length
  x = np.array(prompt + [MASK] * p.gen_length)
  history = []
  for b in range(p.num_blocks):
    s, e = P + b * L, P + (b + 1) * L
    n = int((x[s:e] == MASK).sum())
    counts = [n // p.steps_per_block + (i < n % p.steps_per_block) for i in range(p.steps_per_block)]
    i, cache = 0, None
    while (x[s:e] == MASK).any():
      if not use_cache: logits = model(Tensor([x.tolist()])).numpy()[0, s:e]
      elif cache is None:
        T = len(x)
        h, kv = model.hidden(Tensor([x.tolist()]), Tensor.arange(T).reshape(1, T), Tensor.ones(1, T, dtype=dtypes.bool))
        logits, cache = model.logits(h[:, s - shift:e - shift]).numpy()[0], [(k[:, :s - shift], v[:, :s - shift]) for k, v in kv]
      else:
        q = x[s - shift:]
        h, _ = model.hidden(Tensor([q.tolist()]), Tensor.arange(s - shift, len(x)).reshape(1, -1),
                            Tensor.ones(1, len(x), dtype=dtypes.bool), cache)
        logits = model.logits(h[:, :L]).numpy()[0]
      logits = logits.astype(np.float64)
      noisy = logits if p.temperature == 0 else np.exp(logits) / (-np.log(rng.random(logits.shape))) ** p.temperature
      x0 = noisy.argmax(-1)
      prob = np.exp(logits - logits.max(-1, keepdims=True))
      prob = prob / prob.sum(-1, keepdims=True)
      conf = prob[np.arange(L), x0] if p.remasking == "low_confidence" else rng.random(L)
      conf = np.where(x[s:e] == MASK, conf, -np.inf)
      k = max(1, int((conf >= p.threshold).sum())) if p.threshold is not None else counts[i]
      pick = np.argsort(-conf, kind="stable")[:k]
      x[s + pick] = x0[pick]
      history.append(x.copy())
      i += 1
  return history


def run_batched(model: MaskedDiffusionLM, prompts: list[list[int]], params: list[DiffusionParams], use_cache: bool):
  seqs = [Denoiser(pr, pa, MASK) for pr, pa in zip(prompts, params)]
  history: list[list[np.ndarray]] = [[] for _ in seqs]
  while not all(s.finished for s in seqs):
    live = [s for s in seqs if not s.finished]
    denoise_step(model, live, use_cache)
    for s in live: history[seqs.index(s)].append(s.x.copy())
  return history


PROMPTS = [[1, 50, 60, 70], [1, 80, 90, 100, 110, 120, 130]]


@pytest.mark.parametrize("kw", [
  dict(steps=8),                                                        # LLaDA: 2 tokens per step, greedy
  dict(steps=16, temperature=0.7, remasking="random", seed=3),          # Gumbel noise, random remasking
  dict(steps=8, cfg_scale=1.5, seed=1),                                 # classifier-free guidance
  dict(threshold=0.05),                                                 # Fast-dLLM parallel decoding
])
def test_sampler_matches_reference_loop_step_for_step(tiny, kw):
  """Two prompts of different lengths, batched and padded, against the one-sequence reference loop."""
  params = [DiffusionParams(gen_length=16, block_length=8, **{**kw, "seed": kw.get("seed", 0) + j}) for j in range(2)]
  ours = run_batched(tiny, PROMPTS, params, use_cache=False)
  for j in range(2):
    ref = reference_generate(tiny, PROMPTS[j], params[j]) if not kw.get("cfg_scale") else None
    if ref is None: continue
    assert len(ours[j]) == len(ref)
    for a, b in zip(ours[j], ref): np.testing.assert_array_equal(a, b)


def test_cfg_matches_guided_reference(tiny):
  """cfg: the unconditional row (prompt masked) is batched beside the conditional one; compare the first step."""
  p = DiffusionParams(gen_length=8, block_length=8, steps=4, cfg_scale=2.0)
  seq = Denoiser(PROMPTS[0], p, MASK)
  denoise_step(tiny, [seq], False)
  x = np.array(PROMPTS[0] + [MASK] * 8)
  un = x.copy()
  un[:len(PROMPTS[0])] = MASK
  cond, uncond = (tiny(Tensor([t.tolist()])).numpy()[0, 4:] for t in (x, un))
  guided = uncond + 3.0 * (cond - uncond)
  conf = np.exp(guided - guided.max(-1, keepdims=True))
  conf = (conf / conf.sum(-1, keepdims=True)).max(-1)
  pick = np.argsort(-conf, kind="stable")[:2]
  x[4 + pick] = guided.argmax(-1)[pick]
  np.testing.assert_array_equal(seq.x, x)


def test_prefix_cache_matches_reference_loop(tiny):
  params = [DiffusionParams(gen_length=16, block_length=8, steps=8, seed=j) for j in range(2)]
  ours = run_batched(tiny, PROMPTS, params, use_cache=True)
  for j in range(2):
    ref = reference_generate(tiny, PROMPTS[j], params[j], use_cache=True)
    assert len(ours[j]) == len(ref)
    for a, b in zip(ours[j], ref): np.testing.assert_array_equal(a, b)


def test_engine_batches_requests_and_streams_blocks(tiny_dir, tiny):
  """Through LLMEngine (engine/denoising.py), recomputing every step: LLaDA's tokens, a block streamed at a time."""
  engine = LLMEngine(EngineArgs(model=str(tiny_dir), diffusion_recompute=True, async_scheduling=False))
  params = []
  for seed in (0, 1):
    sp = SamplingParams(max_tokens=16, temperature=0, seed=seed, ignore_eos=True)
    sp.block_length, sp.diffusion_steps = 8, 8          # SamplingParams' diffusion knobs
    params.append(sp)
  ids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS, params)]
  assert (engine.stats().running, engine.stats().waiting) == (0, 2)       # what the server's /metrics shows
  assert isinstance(engine, Engine)                     # everything else the server needs of an engine (engine/protocol.py)
  streamed: dict[str, list] = {i: [] for i in ids}
  steps = 0
  while engine.has_unfinished_requests():
    for out in engine.step(): streamed[out.request_id].append(out)
    steps += 1
  assert steps == 8                                     # both requests advanced together: 2 blocks × 4 steps
  for rid, prompt, sp in zip(ids, PROMPTS, params):
    outs = streamed[rid]
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 16] and outs[-1].finished
    alone = generate(tiny, prompt, DiffusionParams.from_sampling_params(sp))
    assert outs[-1].outputs[0].token_ids == alone.x[len(prompt):].tolist()
    assert outs[-1].outputs[0].finish_reason == "length"


@pytest.fixture(scope="module")
def trained():
  return LLMEngine(EngineArgs(model="llada"))


@pytest.fixture(scope="module")
def trained_model() -> MaskedDiffusionLM: return load_diffusion_model(DJANGO_DIFFUSION_MODEL)[0]


# the first lines of three Django test files from the validation split: the shipped model never trained on them
HELD_OUT = ["# tests/user_commands/tests.py\nimport os\nfrom argparse import ArgumentDe",
            "# tests/timezones/urls.py\nfrom django.urls import path\n\nfrom . import admin as tz",
            "# tests/validators/tests.py\nimport re\nimport types\nfrom datetime import datetime, timedelta\nfrom"]


@pytest.fixture(scope="module")
def held_out_runs(trained, trained_model) -> tuple[dict[str, int], dict[str, float]]:
  """The held-out prompts decoded by LLaDA (one token per step) and by threshold decoding at 0.6: the model calls
  and the mean left-to-right log-likelihood of the output, per mode."""
  model, tok = trained_model, trained.tokenizer
  modes = {"llada": DiffusionParams(gen_length=32, block_length=16),
           "threshold": DiffusionParams(gen_length=32, block_length=16, threshold=0.6)}
  calls, loglik = dict.fromkeys(modes, 0), {name: [] for name in modes}
  for text in HELD_OUT:
    prompt = tok.encode(text)
    for name, params in modes.items():
      seq = generate(model, prompt, params)
      calls[name] += seq.calls
      loglik[name].append(log_likelihood(model, prompt, seq.x[len(prompt):].tolist()))
  return calls, {name: float(np.mean(v)) for name, v in loglik.items()}


def test_threshold_halves_model_calls_at_close_quality(held_out_runs):
  """Fast-dLLM's claim on the shipped model: threshold decoding needs at most half the model calls of one token per
  step, and the model rates what it wrote nearly as high. (Too low a threshold commits incoherent tokens together:
  0.3 on the earlier 13.8M model wrote `strstrstr` and lost 2 nats/token.)"""
  calls, loglik = held_out_runs
  assert calls["threshold"] * 2 <= calls["llada"], calls
  assert loglik["threshold"] >= loglik["llada"] - 0.15, loglik


def test_trained_model_writes_code_for_a_batch_of_requests(trained):
  """Four requests share each forward pass (4 rows × 48 positions: before q and k were materialized after RoPE,
  clang did not finish compiling that batch's attention kernel in 30 minutes on CPU)."""
  sp = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
  sp.threshold = 0.9
  prompts = ["from django.db import models\n\n\nclass Author(models.Model):\n", "    def test_login(self):\n",
             "from django.http import HttpResponse\n\n\ndef index(request):\n", "class Meta:\n"]
  ids = [trained.add_request(p, sp) for p in prompts]
  texts = {}
  while trained.has_unfinished_requests():
    texts.update({out.request_id: out.outputs[0].text for out in trained.step() if out.finished})
  python = {"self", "def", "return", "import", "from", "class", "models", "assert", "if", "in", "for", "None", "True",
            "False", "=", "==", "not", "is", "with", "django", "response", "request", "name", "test"}
  for request_id in ids:
    words = re.findall(r"[A-Za-z_]+|==|=", texts[request_id])
    assert len(words) >= 5 and sum(w in python for w in words) >= 3, texts[request_id]


# ---- a diffusion LM through the paged Llama forward ----------------------------------------------------------------
def paged_llada(tiny: MaskedDiffusionLM, kernels: str):
  """The tiny LLaDA's weights in llama.py's network, run on a paged KV pool (blocks of 4 tokens, one sequence whose
  table is [2, 3, 1, 4]); returns a function of (tokens, first position) → logits of every token [T, V], each
  token seeing every key up to the chunk's end (a key limit past its own position: attention both ways)."""
  from tinygrad import Device
  from tinygrad.nn.state import get_state_dict
  from tinyvllm.kernels.paged_attention import BlockTables, context_blocks, new_pool
  from tinyvllm.model.llama import ForwardBatch, LlamaForCausalLM
  cfg, bs, table = tiny.config.model, 4, [2, 3, 1, 4]
  net = LlamaForCausalLM(cfg)
  net.kernels = kernels
  theirs = get_state_dict(tiny)
  for name, param in get_state_dict(net).items():
    if not name.startswith("rope_"): param.replace(theirs[name]).realize()
  device = (Device.DEFAULT,)
  pools = [(new_pool(6 * bs, cfg.num_kv_heads, cfg.head_dim, dtypes.float32, device),
            new_pool(6 * bs, cfg.num_kv_heads, cfg.head_dim, dtypes.float32, device)) for _ in range(cfg.num_layers)]
  Tensor.realize(*[p for kv in pools for p in kv])
  ints = lambda values: Tensor(np.array(values, np.int32))
  def forward(tokens: list[int], start: int) -> np.ndarray:
    T, end = len(tokens), start + len(tokens)
    blocks = -(-end // bs)
    positions = list(range(start, end))
    tables = BlockTables(ints(table), ints([0] * T),
                         Tensor.full((1,), context_blocks(len(table)).bind(blocks), dtype=dtypes.int32), bs, len(table))
    batch = ForwardBatch(ints(tokens), ints(positions), ints([table[p // bs] * bs + p % bs for p in positions]), tables,
                         ints(list(range(T))), paged=True, key_limits=ints([end - 1] * T))
    return net(batch, pools, every_position=True).numpy()
  return forward


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_a_diffusion_lm_runs_through_the_paged_forward_with_key_limits(tiny, kernels):
  """With every token's key limit at its chunk's end, llama.py's forward on the paged pool is LLaDA's: the whole
  sequence in one chunk gives its bidirectional logits, and a block after a cached prefix gives what the dense
  prefix-cache loop gives (Fast-dLLM's cache: the prefix's K/V computed without the block)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, VOCAB, 14).tolist()
  tokens[9:12] = [MASK] * 3
  forward = paged_llada(tiny, kernels)
  np.testing.assert_allclose(forward(tokens, 0), tiny(Tensor([tokens])).numpy()[0], rtol=1e-3, atol=1e-3)
  prefix, block = tokens[:8], tokens[8:12]
  forward(prefix, 0)                                                     # the prefix's K/V into the pool
  h, past = tiny.hidden(Tensor([prefix]), Tensor([list(range(8))]), Tensor.ones(1, 8, dtype=dtypes.bool))
  h, _ = tiny.hidden(Tensor([block]), Tensor([list(range(8, 12))]), Tensor.ones(1, 12, dtype=dtypes.bool), past)
  np.testing.assert_allclose(forward(block, 8), tiny.logits(h).numpy()[0], rtol=1e-3, atol=1e-3)
