"""Tracking: MLflow is the system of record. Only `mlflow_store` imports mlflow."""
