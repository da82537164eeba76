"""The block diffusion LM that chats (tinyvllm/diffusion/smollm2-diffusion, examples/adapt_diffusion.py): a LoRA delta
over a base model, merged at load (loader.read_adapted_checkpoint), run block-causal with shifted logits. A tiny
random adapter over a tiny base checks the merge and the engine; the shipped one, that it answers a chat prompt and
that its cached steps compute what a full recompute does."""
import json
import shutil
import numpy as np
import pytest
from safetensors.numpy import save_file
from tinyvllm import LLM, SamplingParams
from tinyvllm.diffusion.llada import wants_diffusion
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine_args import EngineArgs
from tinyvllm.model.loader import CHAT_DIFFUSION_MODEL, DJANGO_DIFFUSION_MODEL, read_checkpoint, resolve
from pathlib import Path

TINY_BASE = Path(__file__).parent.parent / "data" / "tiny_models" / "mistral"
MASK, RANK, ALPHA = 5, 4, 8.0


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
  """A tiny Llama base (the tiny Mistral's weights, no window, the Django model's tokenizer) and a random adapter
  naming it as its base."""
  root = tmp_path_factory.mktemp("adapter")
  base = root / "base"
  base.mkdir()
  config = json.loads((TINY_BASE / "config.json").read_text())
  config.pop("sliding_window")
  (base / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
  shutil.copy(TINY_BASE / "model.safetensors", base)
  shutil.copy(DJANGO_DIFFUSION_MODEL / "tokenizer.model", base)
  rng = np.random.default_rng(0)
  delta = {"mask_embedding": rng.normal(size=64).astype(np.float32),
           "model.layers.0.input_layernorm.weight": rng.normal(1, 0.1, 64).astype(np.float32)}
  for layer in range(2):
    for name, (out_f, in_f) in {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (32, 64), "mlp.down_proj": (64, 128)}.items():
      delta[f"model.layers.{layer}.{name}.lora_A"] = rng.normal(0, 0.3, (RANK, in_f)).astype(np.float32)
      delta[f"model.layers.{layer}.{name}.lora_B"] = rng.normal(0, 0.3, (out_f, RANK)).astype(np.float32)
  adapter = root / "adapter"
  adapter.mkdir()
  save_file(delta, str(adapter / "adapter.safetensors"))
  (adapter / "config.json").write_text(json.dumps({"base_model": str(base), "lora_rank": RANK, "lora_alpha": ALPHA,
                                                   "mask_token_id": MASK, "block_causal": True, "logits_shift": 1}))
  return adapter


def test_an_adapter_is_its_base_plus_the_low_rank_products(tiny_adapter):
  cfg, merged, _ = read_checkpoint(tiny_adapter)
  base_cfg, base, _ = read_checkpoint(resolve(json.loads((tiny_adapter / "config.json").read_text())["base_model"]))
  from safetensors.numpy import load_file
  delta = load_file(str(tiny_adapter / "adapter.safetensors"))
  assert (cfg.mask_token_id, cfg.block_causal, cfg.logits_shift) == (MASK, True, 1) and base_cfg.mask_token_id is None
  q = "model.layers.1.self_attn.q_proj"
  np.testing.assert_allclose(merged[q + ".weight"], base[q + ".weight"] + ALPHA / RANK * delta[q + ".lora_B"] @ delta[q + ".lora_A"],
                             rtol=1e-6)
  np.testing.assert_array_equal(merged["model.layers.1.self_attn.k_proj.weight"], base["model.layers.1.self_attn.k_proj.weight"])
  np.testing.assert_array_equal(merged["model.layers.0.input_layernorm.weight"], delta["model.layers.0.input_layernorm.weight"])
  table = merged["model.embed_tokens.weight"]
  np.testing.assert_array_equal(table[MASK], delta["mask_embedding"])
  np.testing.assert_array_equal(np.delete(table, MASK, 0), np.delete(base["model.embed_tokens.weight"], MASK, 0))
  assert wants_diffusion(str(tiny_adapter)) and wants_diffusion("diffusion") and resolve("diffusion") == CHAT_DIFFUSION_MODEL


def test_an_adapted_diffusion_lm_runs_block_causal_in_the_engine(tiny_adapter):
  """Through LLMEngine: its blocks cached (the prompt in chunks) compute what a full recompute does."""
  def run(**kwargs):
    e = LLMEngine(EngineArgs(model=str(tiny_adapter), async_scheduling=False, block_size=4, num_kv_blocks=128, **kwargs))
    params = [SamplingParams(max_tokens=16, block_length=4, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=16, block_length=8, threshold=0.05, temperature=0, ignore_eos=True)]
    ids = [e.add_request(list(range(20 + i, 31 + 2 * i)), p) for i, p in enumerate(params)]
    done = {}
    while e.has_unfinished_requests():
      done.update({out.request_id: out.outputs[0].token_ids for out in e.step() if out.finished})
    return [done[i] for i in ids]
  assert run(max_num_batched_tokens=17) == run(diffusion_recompute=True)


@pytest.fixture(scope="module")
def chat():
  return LLM("diffusion", max_model_len=256)


def test_the_shipped_diffusion_lm_answers_a_chat_prompt(chat):
  """Greedy, blocks of 4, Fast-dLLM's threshold: the answer names Paris and ends (its EOS is SmolLM2's)."""
  out = chat.chat([{"role": "user", "content": "What is the capital of France?"}],
                  SamplingParams(temperature=0, max_tokens=64, block_length=4, threshold=0.9))[0].outputs[0]
  assert "Paris" in out.text and out.finish_reason == "stop"


def test_the_shipped_diffusion_lms_cached_blocks_compute_what_a_recompute_does(chat):
  """Real weights: the prompt's and finished blocks' K/V kept (cached) against every position computed every step."""
  tok = chat.get_tokenizer()
  prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colors."}]), add_special_tokens=False)
  params = SamplingParams(temperature=0, max_tokens=16, block_length=8, threshold=0.7, ignore_eos=True)
  recompute = LLM("diffusion", max_model_len=256, diffusion_recompute=True)
  ours = chat.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids
  assert ours == recompute.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids


def test_a_packed_adapter_keeps_its_merged_matrices_as_q8_0(tiny_adapter):
  """For the packed kernels the merged matrices are packed again as Q8_0: each weight within half a step (d/2) of
  the float merge, plus what storing d in fp16 moves the largest q (127 · d · 2^-11)."""
  _, merged, _ = read_checkpoint(tiny_adapter)
  _, packed, _ = read_checkpoint(tiny_adapter, packed=True)
  for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):
    assert packed[name].type_name == "Q8_0"
    step = np.abs(merged[name]).reshape(-1, 32).max(axis=1) / 127
    error = np.abs(packed[name].dequantize() - merged[name]).reshape(-1, 32).max(axis=1)
    assert np.all(error <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7)
  np.testing.assert_array_equal(packed["model.norm.weight"], merged["model.norm.weight"])
