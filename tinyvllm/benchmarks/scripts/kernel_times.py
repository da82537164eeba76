"""Per-kernel device time of whatever runs inside `kernel_times(...)`: tinygrad's DEBUG=2 lines (each kernel timed
alone, the device synchronized after it) aggregated by kernel name. Kernels replayed from a captured graph are not
timed one by one, so profile a shape's first call (the one in which TinyJit captures it)."""
import collections, contextlib, io, re
from tinygrad import Context


@contextlib.contextmanager
def kernel_times():
  """with kernel_times() as (times, counts): ...  fills two Counters {kernel name: µs summed, calls}."""
  times, counts, buf = collections.Counter(), collections.Counter(), io.StringIO()
  with contextlib.redirect_stdout(buf), Context(DEBUG=2): yield times, counts
  for line in buf.getvalue().splitlines():
    m = re.search(r"\s(\S+)\s+arg.*?tm\s+([\d.]+)(us|ms)", re.sub(r"\x1b\[[0-9;]*m", "", line))
    if m: times[m.group(1)] += float(m.group(2)) * (1000 if m.group(3) == "ms" else 1); counts[m.group(1)] += 1


def report(title: str, times: collections.Counter, counts: collections.Counter, top: int = 12) -> None:
  print(f"== {title}: {sum(times.values()) / 1000:.2f} ms in {sum(counts.values())} kernels")
  for name, t in times.most_common(top): print(f"  {t:9.1f} us  x{counts[name]:3d}  {name}")
