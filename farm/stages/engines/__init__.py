"""Quantize engines other than llm-compressor's oneshot: archived libraries in their own environments
(AutoAWQ, GPTQModel), bitsandbytes NF4, QAT, mixed precision and its layer-sensitivity profile."""
