"""Scheduled re-quantization: detect new base releases and run the job template for each, exactly once."""
