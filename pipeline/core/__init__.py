"""Errors and CLI entry, params, file digests and MLflow tracking shared by every layer."""
