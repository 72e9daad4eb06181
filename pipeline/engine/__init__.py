"""The unit loop: owned units, the window in flight, dispatch, reuse, the closing summary."""
