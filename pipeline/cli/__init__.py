"""The command line: parse, set the CLI process's settings, call one function, map errors to exit codes."""
