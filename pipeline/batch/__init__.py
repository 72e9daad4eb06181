"""The Batch API strategy: batch files, submission, polling and collection."""
