"""Pure policies: packing, rate limits, the probe, known models and prices. No I/O."""
