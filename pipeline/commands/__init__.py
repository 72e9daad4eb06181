"""The commands: run.py (a run through the engine), validate.py, estimate.py and status.py (no API call)."""
