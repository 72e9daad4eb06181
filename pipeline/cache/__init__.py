"""Vectors kept across runs, by (model, dimensions, text): SQLite locally, segments on an object store."""
