"""The serving check: a variant measured as the serving engine runs it.

vLLM pins its own compressed-tensors (0.17 for vLLM 0.24), llm-compressor needs another (0.19), so the engine
never shares a process with the quantize stage: `runner` (in the worker) starts `vllm_engine.py` as a process of
its own, in the environment the spec names, on the GPU the variant was built on, and reads back raw timings;
`measure` (pure) turns them into the metrics every run records and the gate reads.
"""
