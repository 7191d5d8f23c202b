"""The ``scanqueue`` command: one module per command group.

Owns argument parsing, output (tables and ``--json``) and exit codes (0, 1 with
one line on stderr, 2 for usage).  May use every stage below it; nothing
imports it but the console-script entry point.
"""

from scanqueue.cli.main import cli, main

__all__ = ["cli", "main"]
