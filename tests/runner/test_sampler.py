"""The sampler, on fixed logits (a small random "model"): each knob does what vLLM's does, for a whole batch at once."""
import numpy as np
import pytest
from tinygrad import Tensor
from tinyvllm.runner.sampler import FILTERS, MAX_LOGPROBS, _argmax, _kept, plan_and_pack, plans, sample, unpack
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.engine.sequence import Sequence

V = 12
LOGITS = np.random.default_rng(0).normal(0, 1.5, V).astype(np.float32)
ORDER = np.argsort(-LOGITS)


def draw(params: SamplingParams, n: int = 512, outputs: list[int] = (), logits: np.ndarray = LOGITS):
  """n rows of the same request, each at a different output position: n independent draws in one batch."""
  rows = []
  for step in range(n):
    s = Sequence("r", [1, 2, 3], params, seq_id=0)
    s.output_token_ids = list(outputs) + [0] * step      # only the position matters for the noise ...
    rows.append(s)
  if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1:
    for s in rows: s.output_token_ids = list(outputs)    # ... unless penalties read the history
  plan, ints, floats = plan_and_pack(rows, seed_base=0, stop_ids={11}, max_adjusted=256)
  out = sample(Tensor(np.tile(logits, (n, 1))), unpack(Tensor(ints), Tensor(floats), n, plan), plan).numpy()
  return out[:, 0].astype(int), out


def softmax(x): e = np.exp(x - x.max()); return e / e.sum()


def test_frequencies_match_softmax_with_temperature():
  tokens, _ = draw(SamplingParams(temperature=0.7, seed=1), n=4000)
  freq = np.bincount(tokens, minlength=V) / len(tokens)
  assert np.abs(freq - softmax(LOGITS / 0.7)).max() < 0.03


def test_top_k_never_samples_outside_the_k_best():
  tokens, _ = draw(SamplingParams(temperature=1.5, top_k=3, seed=2))
  assert set(tokens) <= set(ORDER[:3]) and len(set(tokens)) == 3


def test_top_p_never_samples_outside_the_nucleus():
  p = softmax(LOGITS)[ORDER]
  nucleus = ORDER[:int(np.searchsorted(np.cumsum(p), 0.8)) + 1]
  tokens, _ = draw(SamplingParams(temperature=1.0, top_p=0.8, seed=3))
  assert set(tokens) <= set(nucleus) and len(set(tokens)) == len(nucleus)


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
  p = softmax(LOGITS)
  allowed = set(np.nonzero(p >= 0.2 * p.max())[0])
  tokens, _ = draw(SamplingParams(temperature=1.0, min_p=0.2, seed=4))
  assert set(tokens) <= allowed and len(set(tokens)) == len(allowed)


@pytest.mark.parametrize("filters", [FILTERS, ("top_p",), ("top_k", "min_p")])
def test_filters_keep_exactly_the_reference_sets_on_a_wide_vocabulary(filters):
  """Thresholds found by the on-device search equal a sort-based reference, tails of ~1e-9 probabilities included,
  also when the batch builds only some of the filters (its rows then leave the others off)."""
  rng = np.random.default_rng(7)
  logits = rng.normal(0, 3, (6, 5000)).astype(np.float32)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  top_k = np.array([0, 1, 50, 0, 10, 4999], np.float32) * ("top_k" in filters)
  top_p = np.array([1, 1, 1, 0.5, 0.3, 0.99], np.float32) if "top_p" in filters else np.ones(6, np.float32)
  min_p = np.array([0, 0, 0, 0, 0, 0.001], np.float32) * ("min_p" in filters)
  col = lambda a: Tensor(a.reshape(-1, 1))
  kept = _kept(Tensor(probs), {"top_k": col(top_k), "top_p": col(top_p), "min_p": col(min_p)}, filters).numpy()
  for row, k, top, floor, got in zip(probs, top_k, top_p, min_p, kept):
    order = np.argsort(-row)[:int(k) or len(row)]
    nucleus = np.cumsum(row[order] / row[order].sum())
    n = len(order) if top >= 1 else int(np.searchsorted(nucleus, top)) + 1
    expected = {t for t in order[:n] if row[t] >= floor * row.max()}
    assert set(np.nonzero(got)[0]) == expected


def test_every_pass_of_the_threshold_search_runs_the_same_kernels(monkeypatch):
  """More passes of the search add no kernel to compile: each pass reads the interval the last one left in memory.
  (Each run has a vocabulary and row count of its own, so that none finds another's kernels compiled; the first
  compiles those that depend on neither.)"""
  from tinygrad import codegen
  from tinyvllm.runner import sampler
  counts = []
  for vocab, S, passes in ((983, 4, 3), (997, 2, 6), (991, 3, 9)):
    monkeypatch.setattr(sampler, "_SEARCH_PASSES", passes)
    rows = [Sequence("r", [1], SamplingParams(temperature=1.0, top_k=3, top_p=0.9, seed=1), seq_id=0)] * S
    plan, ints, floats = plan_and_pack(rows, seed_base=0, stop_ids=set(), max_adjusted=16)
    logits = Tensor(np.random.default_rng(vocab).normal(0, 2, (S, vocab)).astype(np.float32))
    before = set(codegen.to_program_cache)
    sample(logits, unpack(Tensor(ints), Tensor(floats), S, plan), plan).realize()
    counts.append(sum(not program.src[0].arg.name.startswith("hcq")        # the queue runtime's own programs aside
                      for key, program in codegen.to_program_cache.items() if key not in before))
  assert counts[1] == counts[2]


def test_every_mix_of_parameters_gets_one_of_the_few_plans():
  """A graph is captured per (rows, plan), so a new mix of sampling parameters must never make a new plan: the
  cheapest of the fixed set that serves every row."""
  def plan(*params: SamplingParams):
    return plan_and_pack([Sequence(str(i), [1, 2], p, seq_id=i) for i, p in enumerate(params)], 0, set(), 64)[0]
  greedy, sampled, general = plans(64)
  assert plan(SamplingParams(temperature=0), SamplingParams(temperature=0, top_k=5)) == greedy
  assert plan(SamplingParams(temperature=0.7, top_p=0.9)) == plan(SamplingParams(temperature=1, top_k=5),
                                                                   SamplingParams(min_p=0.1)) == sampled
  for extra in (dict(logprobs=0), dict(logprobs=3), dict(frequency_penalty=0.5), dict(logit_bias={3: 1.0}),
                dict(min_tokens=2)):
    assert plan(SamplingParams(temperature=0), SamplingParams(temperature=0.5, **extra)) == general
  assert plan(SamplingParams(prompt_logprobs=2)) == plans(64, prompt=True)[0]


def test_one_reduction_argmax_matches_numpy_with_ties_and_infinities():
  x = np.random.default_rng(8).normal(0, 1, (5, 300)).astype(np.float32)
  x[1, [7, 200]] = 9.0                       # a tie: the first index wins
  x[2] = -np.abs(x[2])                       # all negative
  x[3, :] = -np.inf; x[3, 123] = -50.0       # banned tokens
  x[4, 299] = np.float32(1e30)
  ids, values = (t.numpy() for t in _argmax(Tensor(x)))
  assert (ids[:, 0] == x.argmax(1)).all() and (values[:, 0] == x.max(1)).all()


def test_temperature_zero_and_tiny_temperature_are_greedy():
  assert set(draw(SamplingParams(temperature=0), n=8)[0]) == {ORDER[0]}
  assert set(draw(SamplingParams(temperature=1e-4, seed=5), n=64)[0]) == {ORDER[0]}


def test_seeded_rows_draw_the_same_tokens_wherever_they_sit_in_the_batch():
  a, _ = draw(SamplingParams(temperature=1.0, seed=7), n=16)
  b, _ = draw(SamplingParams(temperature=1.0, seed=7), n=32)
  c, _ = draw(SamplingParams(temperature=1.0, seed=8), n=16)
  assert (a == b[:16]).all() and (a != c).any()


def test_penalties_bias_and_logprobs_equal_a_numpy_reference():
  params = SamplingParams(temperature=0.5, seed=9, presence_penalty=0.5, frequency_penalty=0.3,
                          repetition_penalty=1.3, logit_bias={int(ORDER[-1]): 4.0}, logprobs=3)
  history = [int(ORDER[0])] * 2 + [int(ORDER[1])]
  tokens, out = draw(params, n=4, outputs=history)
  want = LOGITS.copy()
  want[ORDER[-1]] += 4.0
  for t in {1, 2, 3} | set(history):                 # the prompt [1, 2, 3] and the output are "seen"
    want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
  for t in set(history): want[t] -= 0.3 * history.count(t) + 0.5
  logprobs = np.log(softmax(want / 0.5))
  assert np.allclose(out[:, 1], logprobs[tokens], atol=1e-3)
  top = np.argsort(-logprobs)[:3]
  K = MAX_LOGPROBS                                    # the general plan returns that many; the engine keeps 3
  assert (out[:, 2:5].astype(int) == top).all() and np.allclose(out[:, 2 + K:5 + K], logprobs[top], atol=1e-3)


def test_min_tokens_bans_stop_tokens_until_enough_were_generated():
  logits = LOGITS.copy(); logits[11] = 50.0             # token 11 is the stop id
  assert set(draw(SamplingParams(temperature=0, min_tokens=3), n=2, logits=logits)[0]) != {11}
  assert set(draw(SamplingParams(temperature=0, min_tokens=3), n=2, outputs=[5, 5, 5], logits=logits)[0]) == {11}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(n=0),
                                 dict(min_p=2), dict(max_tokens=0), dict(repetition_penalty=0), dict(logprobs=-1)])
def test_out_of_range_values_name_the_field(bad):
  with pytest.raises(ValueError, match=next(iter(bad))): SamplingParams(**bad)
