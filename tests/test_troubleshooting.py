"""Every error message the library raises has an entry in docs/troubleshooting.md.

The messages are read from the source with ``ast``: every call of an exception class (the library's and the built-in
ones) whose first argument is a string or an f-string. An entry must quote the message's opening, up to its first
sentence end or about 60 characters of fixed text, with anything in place of the f-string's fields (the entry may show
an example value, or a placeholder such as ``<argument>``). Whitespace is free, so entries can wrap.
"""

import ast
import re
from pathlib import Path

import pytest

import lightning_tbptt

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"
ERRORS = {name for name in lightning_tbptt.__all__ if name.endswith("Error")} | {
    "IndexError",
    "KeyError",
    "RuntimeError",
    "TypeError",
    "ValueError",
}
FIXED_CHARACTERS = 60  # of fixed text in a message's opening
FIELD = r".{0,160}?"  # what an f-string field may stand for in the page


def message_parts(node: ast.expr) -> list[str | None]:
    """The message as fixed text and fields (``None``), in order."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else None for v in node.values]
    raise TypeError(f"not a message: {ast.unparse(node)}")


def opening(parts: list[str | None]) -> str:
    """A pattern for the message's opening: its first sentence, or about FIXED_CHARACTERS characters of fixed text."""
    while parts and parts[0] is None:  # a leading field (a message built elsewhere) has no fixed text to quote
        parts = parts[1:]
    pattern, fixed = "", 0
    for part in parts:
        if part is None:
            pattern += FIELD
            continue
        end = re.search(r"[.:]\s", part)
        text = part[: end.start() + 1] if end else part
        if fixed + len(text) > FIXED_CHARACTERS:  # cut after a whole word
            cut = text.rfind(" ", 0, max(FIXED_CHARACTERS - fixed, 1))
            text = text[:cut] if cut > 0 else text
            end = True  # type: ignore[assignment]
        if not pattern:  # the page may quote from the first word on
            text = text.lstrip()
        pattern += r"\s+".join(re.escape(word) for word in re.split(r"\s+", text))
        fixed += len(text)
        if end:
            break
    return pattern


def raised_messages() -> list[tuple[str, str, str]]:
    """(where, message source, opening pattern) for every error built in ``lightning_tbptt/*.py``."""
    found = []
    for path in sorted((ROOT / "lightning_tbptt").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS:
                assert node.args, f"{path.name}:{node.lineno}: an error without a message"
                where = f"{path.name}:{node.lineno}"
                found.append((where, ast.unparse(node.args[0]), opening(message_parts(node.args[0]))))
    return found


MESSAGES = raised_messages()


def page_text() -> str:
    return " ".join(PAGE.read_text().split())


def test_the_messages_are_found():
    assert len(MESSAGES) > 80
    assert all(pattern.strip() for _, _, pattern in MESSAGES)


@pytest.mark.parametrize(("where", "message", "pattern"), MESSAGES, ids=[m[0] for m in MESSAGES])
def test_every_raised_error_has_an_entry(where, message, pattern):
    assert re.search(pattern, page_text()), f"{where}: no entry in docs/troubleshooting.md quotes {message[:120]}"


def test_a_missing_entry_is_noticed():
    """Removing an entry's quote makes its message unmatched."""
    text = page_text()
    pattern = next(p for w, _, p in MESSAGES if w.startswith("callback.py"))
    match = re.search(pattern, text)
    assert match
    without = text[: match.start()] + text[match.end() :]
    assert not re.search(pattern, without)
