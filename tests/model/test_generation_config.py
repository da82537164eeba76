"""--generation-config: the sampling defaults a model brings (model/generation_config.py)."""
import json
import pytest
from tinyvllm.engine_args import EngineArgs
from tinyvllm.llm import sampling_defaults
from tinyvllm.model.generation_config import GGUF_DEFAULTS, generation_defaults


def test_a_hugging_face_directory_brings_its_generation_config(tmp_path):
  (tmp_path / "generation_config.json").write_text(json.dumps(
    {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "bos_token_id": 1}))
  expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
  assert generation_defaults("auto", tmp_path) == expected
  assert generation_defaults(str(tmp_path), None) == expected           # --generation-config DIR
  assert generation_defaults("vllm", tmp_path) == {}
  assert generation_defaults("auto", tmp_path / "elsewhere") == GGUF_DEFAULTS       # a GGUF file: none of its own
  with pytest.raises(ValueError, match="generation_config.json"):
    generation_defaults(str(tmp_path / "missing"), None)


def test_the_embedded_model_decodes_greedily_by_default_and_random_weights_have_no_defaults():
  assert sampling_defaults(EngineArgs()) == {"temperature": 0.0}
  assert sampling_defaults(EngineArgs(load_format="dummy")) == sampling_defaults(EngineArgs(model="diffusion")) == {}
