"""Evaluation checks on a loaded model, beyond perplexity (`farm.stages.evaluate`): `runner.run_checks` runs the
ones a job enables. `dense_reference` measures latency and memory under transformers (decompressed weights, a
reference only: deployment figures come from `farm.serving`)."""
