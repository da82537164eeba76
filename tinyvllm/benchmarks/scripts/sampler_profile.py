"""Per-kernel device time of one sampler call (all knobs) on random logits: DEBUG=2 lines aggregated by kernel."""
import sys, numpy as np
import tinyvllm
from tinygrad import Tensor, Device
from tinyvllm.runner.sampler import plan_and_pack, sample, unpack
from tinyvllm.engine.sequence import Sequence
from tinyvllm.benchmarks.commands import SAMPLING_CONFIGS
from kernel_times import kernel_times, report
S, V = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for name, p in SAMPLING_CONFIGS.items():
  rows = []
  for i in range(S):
    s = Sequence(str(i), rng.integers(0, V, 128).tolist(), p, seq_id=i); s.output_token_ids = rng.integers(0, V, 40).tolist(); rows.append(s)
  plan, ints, floats = plan_and_pack(rows, 0, {2}, max_adjusted=1024)
  logits = Tensor(rng.normal(size=(S, V)).astype(np.float32)).realize()
  args = (Tensor(ints).realize(), Tensor(floats).realize())
  sample(logits, unpack(*args, S, plan), plan).realize(); Device[Device.DEFAULT].synchronize()
  with kernel_times() as (times, counts): sample(logits, unpack(*args, S, plan), plan).realize()
  report(f"{name} S={S} V={V}", times, counts)
