"""SameBody (tinygrad_internals.py): a decoder layer's body is traced once and replayed with each layer's weights,
unless the layers' bodies differ, and then every layer is traced."""
import numpy as np
from tinygrad import Tensor
from tinyvllm.tinygrad_internals import SameBody


class Layer:
  def __init__(self, weight: float, scale: float):
    self.weight, self.scale = Tensor.full((4,), weight).contiguous().realize(), scale   # scale: a Python constant


def forward(layer: Layer, x: Tensor) -> Tensor: return (x * layer.weight * layer.scale).contiguous()


def run(layers: list[Layer]) -> tuple[np.ndarray, SameBody]:
  body, x = SameBody(forward), Tensor.ones(4).contiguous().realize()
  for layer in layers: x = body(layer, x)
  return x.numpy(), body


def test_one_body_serves_every_layer_with_its_own_weights():
  out, body = run([Layer(w, 1.0) for w in (1.0, 2.0, 3.0, 4.0)])
  np.testing.assert_allclose(out, 24.0)
  assert body.reuse and list(body.traced.values()) == [2]       # traced for layers 0 and 1 only


def test_layers_whose_bodies_differ_are_each_traced():
  out, body = run([Layer(1.0, s) for s in (1.0, 2.0, 3.0, 4.0)])
  np.testing.assert_allclose(out, 24.0)                         # a reused body would have scaled by 1 each time
  assert not body.reuse and list(body.traced.values()) == [4]
