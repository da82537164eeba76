from setuptools import setup, find_packages

setup(
  name="tinyvllm",
  version="0.1.0",
  description="A small, readable LLM inference engine on tinygrad: paged KV cache, continuous batching, "
              "chunked prefill, prefix caching, an OpenAI-compatible server, and diffusion LLMs.",
  packages=find_packages(include=["tinyvllm", "tinyvllm.*"]),
  package_data={"tinyvllm": ["server/static/*", "diffusion/llada-django/*", "diffusion/smollm2-diffusion/*"]},
  python_requires=">=3.10",
  install_requires=["tinygrad==0.14.0", "numpy", "sentencepiece", "tiktoken", "safetensors", "aiohttp", "jinja2>=3.1.6", "llguidance"],
  extras_require={"test": ["pytest", "openai", "jsonschema"]},
)
