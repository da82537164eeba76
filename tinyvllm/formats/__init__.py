"""Files and text in and out: GGUF reading and conversion, tokenizers, chat templates, and the detokenizer."""
