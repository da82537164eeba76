"""Masked-diffusion LLMs behind the same API: the engine, the denoising sampler, the LLaDA model, and the shipped
llada-django checkpoint."""
