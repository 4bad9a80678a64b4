"""The ``lightning-tbptt`` command (also ``python -m lightning_tbptt``): ``lightning-tbptt demo --help``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``lightning-tbptt [--version] demo [flags]``."""
    from lightning_tbptt import __version__, demo

    parser = argparse.ArgumentParser(
        prog="lightning-tbptt", description="Truncated backpropagation through time for PyTorch Lightning."
    )
    parser.add_argument("--version", action="version", version=f"lightning-tbptt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_parser = commands.add_parser(
        "demo",
        help="train a character-level LSTM on the standard library's source with TBPTT",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the chosen command."""
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
