"""`grains-edge`: one command, one subcommand per job; user-fixable errors print as one line."""

from __future__ import annotations

import argparse
import importlib
import sys

from grains_edge import crash_log
from grains_edge.errors import GrainsError

COMMANDS = ("export", "chat", "vectors", "eval", "tune", "builtins", "serve", "profiles")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grains-edge", description="Steer a local language model with GRAINS vectors, on ONNX Runtime."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"grains_edge.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"grains_edge.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except GrainsError as error:
        print(f"grains-edge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("grains-edge: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: one line here, the traceback in a log file
        return crash_log.report(error)


if __name__ == "__main__":
    sys.exit(main())
