"""tinyvllm: a small, readable LLM inference engine on tinygrad. Start at `engine/engine.py`."""
import os
# tinygrad's queue-based runtime (HCQ2): on backends that have one (CPU, AMD) a replayed TinyJit graph is submitted
# as one command buffer that a device thread runs, instead of one Python call per kernel. A SmolLM2 decode step is
# ~600 kernels, so on CPU this is 2.6x faster batch-1 decode. Backends without it (CUDA, Metal) ignore the flag.
# tinygrad reads it once, at import: set it before anything imports tinygrad.
import sys
if "tinygrad.engine.realize" in sys.modules and "HCQ2" not in os.environ:
  import warnings
  warnings.warn("tinygrad was imported before tinyvllm, so its queue runtime (HCQ2) is off: on a CPU every replayed "
                "graph then launches its kernels one Python call at a time (decode ~2-3x slower). Import tinyvllm "
                "first, or set HCQ2=1.", stacklevel=2)
os.environ.setdefault("HCQ2", "1")
from tinyvllm.sampling_params import SamplingParams, StructuredOutputsParams
from tinyvllm.llm import LLM
from tinyvllm.engine_args import EngineArgs
from tinyvllm.engine.engine import LLMEngine
from tinyvllm.engine.protocol import CompletionOutput, RequestOutput
from tinyvllm.async_engine import AsyncLLMEngine

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineArgs", "LLMEngine", "AsyncLLMEngine",
           "RequestOutput", "CompletionOutput"]
