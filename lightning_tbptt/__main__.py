"""The ``lightning-tbptt`` command (also ``python -m lightning_tbptt``): ``lightning-tbptt demo --help``.

A refused flag, and an error of the library (a :class:`~lightning_tbptt.TBPTTError`) raised while the demo runs, end
the command with one line on the standard error, as ``argparse`` reports its own errors: ``lightning-tbptt demo:
error: <message>``, with exit status 2 for a flag or setting refused (a ``ConfigurationError`` included) and 1 for
another error of the library. Any other exception is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import NoReturn

USAGE_ERROR = 2
"""The exit status of a refused flag or setting (as ``argparse`` exits for its own errors)."""
RUNTIME_ERROR = 1
"""The exit status of another error of the library (a ``BatchError``, ``ModelError`` or ``NoSegmentError``)."""

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`([^`]+)`")


def plain(text: str) -> str:
    """The plain text of reST ``text`` for a terminal: roles shown as Sphinx shows them, double backticks dropped.

    >>> plain("with :class:`~lightning_tbptt.LaneDataModule` (``streaming=True``), see :func:`resume_flags`")
    'with LaneDataModule (streaming=True), see resume_flags'
    """

    def role(match: re.Match[str]) -> str:
        target = match[1]
        if "<" in target:  # :role:`title <target>`
            return target.split("<")[0].strip()
        return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target

    return _ROLE.sub(role, text).replace("``", "")


class ParagraphFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description or epilog to the terminal, and never after a flag's hyphen.

    Indented paragraphs (examples) stay as written.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            if paragraph.startswith(" "):
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                paragraphs.append(
                    textwrap.fill(
                        " ".join(paragraph.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent,
                        break_on_hyphens=False,
                    )
                )
        return "\n\n".join(paragraphs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``lightning-tbptt [--version] demo [flags]``."""
    from lightning_tbptt import __version__, demo

    parser = argparse.ArgumentParser(
        prog="lightning-tbptt",
        description="Truncated backpropagation through time for PyTorch Lightning.",
        epilog="Run 'lightning-tbptt demo --help' for the flags of the demo.",
        formatter_class=ParagraphFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lightning-tbptt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    demo_parser = commands.add_parser(
        "demo",
        help="train a character-level LSTM on the standard library's source with TBPTT",
        description=plain(demo.__doc__ or ""),
        formatter_class=ParagraphFormatter,
        epilog="A refused flag or setting ends the command with one line, 'lightning-tbptt demo: error: ...', and exit"
        " status 2; another error of the library with status 1; Ctrl-C with status 130.",
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    return parser


def _fail(command: str, message: str, status: int) -> NoReturn:
    sys.stderr.write(f"lightning-tbptt {command}: error: {message}\n")
    raise SystemExit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run the chosen command; a refused flag or a library error ends in one line."""
    from lightning_tbptt import ConfigurationError, TBPTTError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except SystemExit as exit:
        # the demo refuses a flag with `SystemExit("error: argument --flag: ...")`; other exits pass as they are
        if isinstance(exit.code, str) and exit.code.startswith("error: "):
            _fail(args.command, exit.code.removeprefix("error: "), USAGE_ERROR)
        raise
    except TBPTTError as error:
        _fail(args.command, str(error), USAGE_ERROR if isinstance(error, ConfigurationError) else RUNTIME_ERROR)


if __name__ == "__main__":
    main()
