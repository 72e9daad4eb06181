"""What is done: the output's names, unit records, the manifest, journals, the part writer."""
