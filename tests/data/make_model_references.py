"""Generate the small random-weight checkpoints in tests/data/tiny_models/ and their Hugging Face reference outputs.

It documents how the data was made; it is NOT part of the project and NOT run by the tests: it needs torch and
transformers, which tinyvllm does not depend on. Run it by hand in a throwaway virtualenv:

    /tmp/venv/bin/pip install torch transformers safetensors
    /tmp/venv/bin/python tests/data/make_model_references.py

For each architecture (Qwen3: q/k norms and a head_dim that is not hidden/heads; Mistral: a sliding window shorter
than the prompt; Gemma 3: sandwich norms, GeGLU, a scaled embedding, a sliding and a global layer) it writes <name>/config.json and <name>/model.safetensors (float16 weights, seeded) and
<name>/reference.json: a 40-token prompt, the greedy continuation computed in float32 with a full forward pass per
step (eager attention, no cache: the masks exactly as transformers builds them), each step's top-2 logit margin,
and the prompt's last-position logits. The tests supply the tokenizer (the shipped diffusion model's).
"""
import json
import sys
from pathlib import Path
import numpy as np
import torch
import transformers
from safetensors.torch import save_file

OUT = Path(__file__).parent / "tiny_models"
COMMON = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2)
MODELS = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
                    dict(head_dim=32, tie_word_embeddings=True)),
          "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                      dict(head_dim=16, sliding_window=16, tie_word_embeddings=False)),
          # a sliding and a global layer with their own RoPE bases, a query scale that is not 1/sqrt(head_dim)
          "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                     dict(head_dim=32, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                          query_pre_attn_scalar=24, rope_local_base_freq=100.0,
                          tie_word_embeddings=True))}
PROMPT = [(37 * i + 11) % 4000 + 5 for i in range(40)]
STEPS = 12


def main(names: list[str]) -> None:
  for name, (config_class, model_class, extra) in MODELS.items():
    if names and name not in names: continue
    torch.manual_seed(0)
    config = config_class(**(COMMON | extra), attn_implementation="eager")
    model = model_class(config).eval()
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if name == "gemma3" and pname.endswith("norm.weight"): p.normal_(0.0, 0.5)   # Gemma starts them at 0 (1 + w)
        p.copy_(p.half().float())                                     # the stored float16 values, exactly
      ids, margins = list(PROMPT), []
      last_logits = model(torch.tensor([PROMPT])).logits[0, -1].numpy()
      for _ in range(STEPS):
        logits = model(torch.tensor([ids])).logits[0, -1]
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(logits.argmax()))
    path = OUT / name
    path.mkdir(parents=True, exist_ok=True)
    config.architectures = [model_class.__name__]
    config.save_pretrained(path)
    tensors = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings: tensors.pop("lm_head.weight", None)
    save_file(tensors, path / "model.safetensors")
    (path / "reference.json").write_text(json.dumps({
      "prompt": PROMPT, "output": ids[len(PROMPT):], "top2_margins": margins,
      "last_logits": [round(float(x), 5) for x in last_logits],
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}))
    print(name, ids[len(PROMPT):], min(margins))


if __name__ == "__main__": main(sys.argv[1:])     # the names of MODELS to make (all by default)
