"""Reading the inputs: files found and fingerprinted, units streamed, texts prepared."""
