"""The ``run-telemetry`` (or ``python -m telemetry``) command line: one sub-command per module that defines ``register``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__

# Each module named here defines ``register(subparsers)``, adding its sub-commands with
# ``set_defaults(func=handler)``; a handler takes the parsed namespace and returns the exit code.
COMMAND_MODULES: tuple[str, ...] = ("consumer", "remote", "validate", "schema", "runner")


def prog_name() -> str:
    """``run-telemetry`` when installed (import package ``run_telemetry``), else ``python -m telemetry``."""
    return "run-telemetry" if __package__ == "run_telemetry" else "python -m telemetry"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog=prog_name(),
        description="Run Telemetry: validate runs, wait for done markers, write markers, drive runs.",
    )
    parser.add_argument("--version", action="version", version=f"run-telemetry {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return int(func(args))
