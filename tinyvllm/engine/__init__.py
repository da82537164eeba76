"""The engine: `LLMEngine.step()` (engine.py) and what it steps with: the scheduler, the paged KV block manager,
the radix prefix cache and the sequences; protocol.py is the Engine protocol every engine implements."""
