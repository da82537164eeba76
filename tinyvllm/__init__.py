"""tinyvllm: a small, readable LLM inference engine on tinygrad. Start at `engine.py`."""
from tinyvllm.sampling_params import SamplingParams
from tinyvllm.llm import LLM
from tinyvllm.config import EngineArgs
from tinyvllm.engine import LLMEngine, AsyncLLMEngine, RequestOutput, CompletionOutput

__all__ = ["LLM", "SamplingParams", "EngineArgs", "LLMEngine", "AsyncLLMEngine", "RequestOutput", "CompletionOutput"]
