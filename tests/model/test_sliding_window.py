"""A sliding window (Mistral's `sliding_window`): each token attends to the last `window` positions only. The kernels
are checked against numpy in tests/kernels/test_paged_attention.py; here, a whole model: its config, and the fast
kernels against the readable reference with a window shorter than the prompt."""
import pytest
from tinyvllm import LLM, SamplingParams
from tinyvllm.model import config
from tinyvllm.model.config import ModelConfig

BASE = {"architectures": ["MistralForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("fields, window", [({"sliding_window": 4096}, 4096), ({"sliding_window": None}, None), ({}, None),
                                            ({"sliding_window": 32768, "use_sliding_window": False}, None)])
def test_the_window_comes_from_the_config(fields, window):
  assert ModelConfig.from_hf({**BASE, **fields}).sliding_window == window


def test_a_window_shorter_than_the_prompt_gives_the_reference_tokens(monkeypatch):
  """The real SmolLM2 given a 24-token window (its weights never saw one, but both paths must agree on what it
  computes): greedy tokens of a 70-token prompt through the fast kernels equal the reference's, and differ from the
  model without a window."""
  prompt = "Here is a list of fruits: apples, bananas, cherries, dates, figs, grapes, kiwis, lemons, mangoes, " \
           "oranges, pears, plums, quinces. Repeat the list, then add three vegetables."
  params = SamplingParams(temperature=0, max_tokens=12, logprobs=1)
  def run(kernels: str) -> tuple[list[int], list[float]]:
    out = LLM(max_model_len=128, kernels=kernels, async_scheduling=False).generate([prompt], params)[0].outputs[0]
    return out.token_ids, [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]
  full = run("fast")
  monkeypatch.setattr(config, "_sliding_window", lambda cfg: 24)
  fast, reference = run("fast"), run("reference")
  assert fast[0] == reference[0]
  assert fast[1] == pytest.approx(reference[1], abs=2e-3)
  assert fast[1] != pytest.approx(full[1], abs=2e-3)                    # the window changed what the model sees
