"""A model's own sampling defaults: what a request gets for each sampling field it leaves unset (vLLM's
`--generation-config`). A model is tuned for its sampling: the OpenAI API's default temperature, 1.0, makes a small
instruct model ramble (SmolLM2-135M, "What is the capital of France?": "L'Améhéptic, le marché de France, is the
capital of France, ..."). Its first token there is 'The' with probability 0.152 and 'L' with 0.14, so even at
temperature 0.2 a third of its answers start "L'Étoile ..."; greedy, it answers "The capital of France is Paris.",
and greedy is what Hugging Face transformers does with this checkpoint (its generation_config.json sets no sampling).

    --generation-config auto       a Hugging Face directory's generation_config.json (temperature, top_p, top_k,
                                   min_p, repetition_penalty); a GGUF carries none, so it gets GGUF_DEFAULTS
    --generation-config vllm       none: every unset field keeps SamplingParams' default (temperature 1.0)
    --generation-config DIR        DIR/generation_config.json

A request's own values, and an explicit `SamplingParams` passed to `LLM.generate`, always win.
"""
from __future__ import annotations
import json
from pathlib import Path

FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# greedy, as transformers decodes the embedded SmolLM2 (above): the default of a GGUF, which carries no sampling settings
GGUF_DEFAULTS = {"temperature": 0.0}


def generation_defaults(setting: str, model_path: Path | None) -> dict[str, float | int]:
  """The sampling defaults for `setting` ("auto", "vllm" or a directory); `model_path`: the checkpoint (None for
  random weights, which have no defaults)."""
  if setting == "vllm": return {}
  if setting != "auto":
    path = Path(setting).expanduser() / "generation_config.json"
    if not path.is_file(): raise ValueError(f"--generation-config: no generation_config.json in {setting!r}")
    return _read(path)
  if model_path is None: return {}
  if model_path.is_dir():
    return _read(model_path / "generation_config.json") if (model_path / "generation_config.json").is_file() else {}
  return dict(GGUF_DEFAULTS)


def _read(path: Path) -> dict[str, float | int]:
  config = json.loads(path.read_text(encoding="utf-8"))
  return {name: config[name] for name in FIELDS if config.get(name) is not None}
