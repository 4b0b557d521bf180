"""Fuzzing: a runner with budgeted child processes and one target module per parser."""
