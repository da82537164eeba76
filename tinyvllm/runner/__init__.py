"""A scheduled step on the device: model_runner.py runs it as one flat batch through a bounded set of TinyJit
graphs (graphs.py, all captured before a server is ready), and sampler.py turns the logits into tokens for the whole
batch."""
