"""farm: a distributed batch quantization farm for LLMs on Ray, with MLflow as the system of record."""

__version__ = "0.1.0"
