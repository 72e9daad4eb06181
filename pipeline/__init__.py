"""Batch embedding of Parquet/CSV text columns through OpenAI-compatible
providers or an in-process model, with a checkpoint a rerun continues from."""

__version__ = "0.1.0"
