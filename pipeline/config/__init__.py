"""The job file: YAML read into frozen dataclasses that check themselves."""
