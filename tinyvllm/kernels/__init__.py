"""The fast kernels, each tested against the readable path in model/llama.py (`kernels="reference"`)."""
