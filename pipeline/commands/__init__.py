"""The commands that are not a run: validate, estimate, status."""
