"""Shared fixtures: the real SmolLM2 (loaded once per test session) and its Hugging Face reference data."""
import json
from pathlib import Path
import pytest
import tinyvllm  # noqa: F401  (first: it sets tinygrad's runtime flags before any test module imports tinygrad)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def reference() -> dict:
  return json.loads((DATA / "smollm2_reference.json").read_text())


@pytest.fixture(scope="session")
def smollm2():
  """The embedded default model (max_model_len fits the 2,000-token prompt). Prefix caching is off so that its
  outputs are the plain reference that cached, batched and preempted runs are compared with."""
  from tinyvllm import LLM
  return LLM(max_model_len=2304, max_num_batched_tokens=256, enable_prefix_caching=False)


def near_tie_prefix(margins: list[float], threshold: float = 0.02) -> int:
  """How many greedy tokens are decided by more than `threshold` (after the first near-tie either choice is fine)."""
  return next((i for i, m in enumerate(margins) if m < threshold), len(margins))
