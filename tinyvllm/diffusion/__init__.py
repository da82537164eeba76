"""Masked-diffusion LLMs behind the same API: the LLaDA/Dream networks, the dense reference sampler, and the two
shipped checkpoints: smollm2-diffusion (SmolLM2 adapted into a block diffusion LM that chats, `--model diffusion`) and
llada-django (a 31.5M LLaDA trained on Django's source, `--model llada`)."""
