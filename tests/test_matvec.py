"""The matvec kernel (GPUs' one-row projections, model/matvec.py) against numpy: the plain product, with the RMSNorm
taken inside, and with the residual added. On a CPU it is run untiled (the tiling needs thread blocks); a GPU runs
it tiled (`DEV=CUDA pytest tests/test_matvec.py`)."""
import numpy as np
import pytest
from tinygrad import Device, Tensor, dtypes
from tinygrad.nn import RMSNorm
from tinyvllm.model import matvec


@pytest.fixture
def kernel_everywhere(monkeypatch):
  """On a CPU, take the kernel anyway, with no tiling; elsewhere, as it is."""
  if not Device[Device.DEFAULT].renderer.has_local:
    monkeypatch.setattr(matvec, "_has_thread_blocks", lambda device: True)
    monkeypatch.setattr(matvec, "_tiling", lambda rows, N, K: ())


@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("N,K", [(64, 1024), (96, 576), (48, 64)])   # the tilings' sizes down to the smallest
@pytest.mark.parametrize("with_norm,with_residual", [(False, False), (True, False), (False, True), (True, True)])
def test_matvec_equals_numpy(kernel_everywhere, rows, N, K, with_norm, with_residual):
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((rows, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32) / 16
  gain, residual = rng.uniform(0.5, 1.5, K).astype(np.float32), rng.standard_normal((rows, N)).astype(np.float32)
  dtype = dtypes.half if Device[Device.DEFAULT].renderer.has_local else dtypes.float
  as_t = lambda a: Tensor(a).cast(dtype).realize()
  norm = None
  if with_norm:
    norm = RMSNorm(K, eps=1e-5)
    norm.weight = as_t(gain)
  assert matvec.uses_matvec(as_t(x), as_t(w)) == (matvec._tiling(rows, N, K) is not None)
  got = matvec.linear(as_t(x), as_t(w), norm=norm, residual=as_t(residual) if with_residual else None)
  normed = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * gain if with_norm else x
  want = normed @ w.T + (residual if with_residual else 0)
  tol = 2e-2 if dtype == dtypes.half else 1e-4
  np.testing.assert_allclose(got.float().numpy(), want, atol=tol * np.abs(want).max(), rtol=0)


def test_many_rows_keep_the_plain_matmul():
  x, w = Tensor.ones(matvec.MAX_ROWS + 1, 64), Tensor.ones(32, 64)
  assert not matvec.uses_matvec(x, w)
