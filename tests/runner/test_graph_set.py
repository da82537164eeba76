"""The runner's bounded set of model graphs: every token count a step can have maps into it, and on a GPU with tensor
cores no step of 5-8 tokens runs where neither the few-row kernel nor the tensor-core kernel serves its projections."""
from types import SimpleNamespace
from tinyvllm.runner.graphs import Graphs


def runner(min_tiled_tokens: int, max_tokens: int = 256, max_rows: int = 64):
  r = SimpleNamespace(min_tiled_tokens=min_tiled_tokens, max_tokens=max_tokens, max_rows=max_rows, diffusion=False)
  r.model_shape = lambda n, every=False: Graphs.model_shape(r, n, every)
  return r


def test_every_token_count_has_a_graph_that_holds_it():
  for tiled in (0, 16):
    r = runner(tiled)
    models, _ = Graphs.graph_set(SimpleNamespace(**vars(r), max_adjusted=64, mask_words=0))
    Ts = {m.T for m in models if not m.every}
    for n in range(1, r.max_tokens + 1):
      shape = r.model_shape(n)
      assert shape.T >= n and shape.T in Ts and shape.R <= r.max_rows


def test_tensor_cores_take_steps_of_five_to_eight_tokens_into_the_sixteen_token_graph():
  assert [runner(16).model_shape(n).T for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 16, 16, 16, 16, 32]
  assert [runner(0).model_shape(n).T for n in (4, 5, 8, 9)] == [4, 8, 8, 16]
  assert runner(16, max_tokens=8).model_shape(5).T == 8            # no 16-token graph to go to
  assert 8 not in {m.T for m in Graphs.graph_set(SimpleNamespace(**vars(runner(16)), max_adjusted=64,
                                                                       mask_words=0))[0]}
