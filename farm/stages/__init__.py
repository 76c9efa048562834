"""Stages a worker runs: quantize, evaluate. Plain functions with typed inputs and results; no Ray here."""
