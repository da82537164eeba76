"""Per-kernel device time of one sampler call (all knobs) on random logits: DEBUG=2 lines aggregated by kernel."""
import sys, re, io, contextlib, collections, numpy as np
import tinyvllm
from tinygrad import Tensor, Context, Device
from tinyvllm.sampler import plan_and_pack, sample, unpack
from tinyvllm.sequence import Sequence
from tinyvllm.benchmark.commands import SAMPLING_CONFIGS
S, V = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for name in ("greedy", "all_knobs"):
  p = SAMPLING_CONFIGS[name]
  rows = []
  for i in range(S):
    s = Sequence(str(i), rng.integers(0, V, 128).tolist(), p, seq_id=i); s.output_token_ids = rng.integers(0, V, 40).tolist(); rows.append(s)
  plan, ints, floats = plan_and_pack(rows, 0, {2})
  logits = Tensor(rng.normal(size=(S, V)).astype(np.float32)).realize()
  args = (Tensor(ints).realize(), Tensor(floats).realize())
  sample(logits, unpack(*args, S, plan), plan).realize(); Device[Device.DEFAULT].synchronize()
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf), Context(DEBUG=2): sample(logits, unpack(*args, S, plan), plan).realize()
  times = collections.Counter(); count = collections.Counter()
  for line in buf.getvalue().splitlines():
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    m = re.search(r"\s(\S+)\s+arg.*?tm\s+([\d.]+)(us|ms)", line)
    if m: t = float(m.group(2)) * (1000 if m.group(3) == "ms" else 1); times[m.group(1)] += t; count[m.group(1)] += 1
  print(f"== {name} S={S} V={V}: {sum(times.values())/1000:.2f} ms in {sum(count.values())} kernels")
  for k, t in times.most_common(12): print(f"  {t:9.1f} us  x{count[k]:3d}  {k}")
