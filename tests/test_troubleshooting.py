"""Every error message the library raises has an entry in docs/troubleshooting.md.

The messages are read from the source with ``ast``: every call of an exception class (the library's and the built-in
ones, ``SystemExit`` included, called by name or as an attribute such as ``errors.BatchError``) whose first argument
is a string or an f-string. An entry must quote the message's opening, up to its first sentence end (``". "``, or
``": "`` once 30 characters are quoted) or about 60 characters of fixed text, with anything in place of the f-string's
fields (the entry may show an example value, or a placeholder such as ``<argument>``). Whitespace is free, so entries
can wrap.

A field is fixed text where the source fixes it, so that a message written once for several arguments needs an entry
for each of them: a parameter of the enclosing function takes the constant each call passes (e.g. ``"lanes"`` in
``_check_int(lanes, "lanes", 1, ...)``, one message per call), a loop over constants takes each of them, and a local
variable or module-level constant computed from those takes its value; an ``if`` those values decide is followed one
way only (a call passing a valid default builds no message), and every message is checked with its fields unresolved
too. Where such a field is a name (an argument or a flag), the entry may instead quote the message for another name
and list this one right after the closing of the quote, as in ``(also `steps`, `eval_lanes`)``. A field stands for
text inside one quote, never across its end.
"""

import ast
import builtins
import re
from pathlib import Path
from typing import Any

import pytest

import lightning_tbptt

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"
ERRORS = {name for name in lightning_tbptt.__all__ if name.endswith("Error")} | {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException) and not issubclass(value, Warning)
}
FIXED_CHARACTERS = 60  # of fixed text in a message's opening
COLON_AFTER = 30  # a colon ends the opening only after this many characters ("error: argument --x:" does not)
FIELD = r"(?:(?!``).){0,160}?"  # what an f-string field may stand for in the page: text inside one quote
NAME_FIELD = r"[^\s`]{1,60}"  # a name field in an entry that lists the other names after its quote
ALSO = r"(?:(?!``).){0,300}?``\s*\(also\b[^)]*?`"  # the rest of the quote, then "(also ... `name`"
NAME = re.compile(r"-{0,2}[A-Za-z_][\w-]*")  # a resolved value that is a name: an argument or a flag
UNKNOWN = object()
SAFE_BUILTINS = {
    name: getattr(builtins, name)
    for name in ("bool", "int", "isinstance", "len", "list", "repr", "sorted", "str", "tuple")
}
CONSTANTS: dict[str, Any] = {}  # the package's module-level constants, filled in below

Part = str | tuple[str, bool] | None  # fixed text, a resolved field (its text, whether it is a name), or a field


# --------------------------------------------------------------------------------------------------------------------
# Reading the messages from the source
# --------------------------------------------------------------------------------------------------------------------


def evaluate(node: ast.expr, env: dict[str, Any]) -> Any:
    """The value of ``node`` when it depends only on constants and ``env``, else ``UNKNOWN``."""
    env = CONSTANTS | env
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if not names <= env.keys() | SAFE_BUILTINS.keys() or any(isinstance(n, ast.Lambda) for n in ast.walk(node)):
        return UNKNOWN
    try:
        return eval(compile(ast.Expression(node), "<message>", "eval"), {"__builtins__": SAFE_BUILTINS}, env)
    except Exception:
        return UNKNOWN


def holds(node: ast.expr, env: dict[str, Any]) -> bool | None:
    """Whether a condition holds, or None when it depends on what is not known (``and``/``or`` decided early)."""
    if isinstance(node, ast.BoolOp):
        values = [holds(value, env) for value in node.values]
        decisive = isinstance(node.op, ast.Or)  # the value that decides an `or` (True) or an `and` (False)
        if decisive in values:
            return decisive
        return None if None in values else not decisive
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        value = holds(node.operand, env)
        return None if value is None else not value
    value = evaluate(node, env)
    return None if value is UNKNOWN else bool(value)


def module_constants(modules: dict[str, ast.Module]) -> dict[str, Any]:
    """The package's module-level constants (``TRANSFER_CHOICES = ("segment", "batch")``) whose name is unique."""
    found: dict[str, Any] = {}
    seen: set[str] = set()
    for tree in modules.values():
        for statement in tree.body:
            targets = statement.targets if isinstance(statement, ast.Assign) else [getattr(statement, "target", None)]
            value = getattr(statement, "value", None)
            for target in targets:
                if not isinstance(target, ast.Name) or value is None:
                    continue
                if target.id in seen:
                    found.pop(target.id, None)
                    continue
                seen.add(target.id)
                constant = evaluate(value, found)
                if constant is not UNKNOWN:
                    found[target.id] = constant
    return found


def message_parts(node: ast.expr, env: dict[str, Any]) -> list[Part]:
    """The message as fixed text, fields resolved from ``env`` and other fields (``None``), in order."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if not isinstance(node, ast.JoinedStr):
        raise TypeError(f"not a message: {ast.unparse(node)}")
    parts: list[Part] = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(value.value)
            continue
        assert isinstance(value, ast.FormattedValue)
        resolved = evaluate(value.value, env)
        spec = "" if value.format_spec is None else evaluate(value.format_spec, env)
        if resolved is UNKNOWN or spec is UNKNOWN:
            parts.append(None)
            continue
        convert = {-1: str, ord("s"): str, ord("r"): repr, ord("a"): ascii}[value.conversion]
        text = format(convert(resolved) if value.conversion != -1 else resolved, spec)
        parts.append((text, isinstance(resolved, str) and bool(NAME.fullmatch(text))))
    return parts


def words(text: str) -> str:
    return r"\s+".join(re.escape(word) for word in re.split(r"\s+", text))


def opening(parts: list[Part], generic_names: bool = False) -> tuple[str, list[str]]:
    """A pattern for the message's opening, and the resolved names in it.

    The opening is the first sentence, or about FIXED_CHARACTERS characters of fixed text. With ``generic_names``, a
    resolved name stands for any name (for an entry that lists the others after its quote).
    """
    while parts and parts[0] is None:  # a leading field (a message built elsewhere) has no fixed text to quote
        parts = parts[1:]
    pattern, fixed, names = "", 0, []
    for part in parts:
        if part is None:
            pattern += FIELD
            continue
        if isinstance(part, tuple):
            text, is_name = part
            if is_name:
                names.append(text)
                if generic_names:
                    pattern += NAME_FIELD
                    fixed += len(text)
                    continue
        else:
            text = part
        end = next(
            (m for m in re.finditer(r"[.:]\s", text) if m.group()[0] == "." or fixed + m.start() >= COLON_AFTER), None
        )
        text = text[: end.start() + 1] if end else text
        done = bool(end)
        if fixed + len(text) > FIXED_CHARACTERS:  # cut after a whole word
            cut = text.rfind(" ", 0, max(FIXED_CHARACTERS - fixed, 1))
            text = text[:cut] if cut > 0 else text
            done = True
        if not pattern:  # the page may quote from the first word on
            text = text.lstrip()
        pattern += words(text)
        fixed += len(text)
        if done:
            break
    return pattern, names


class Message:
    """One message the library raises, with its fields resolved as far as the source fixes them."""

    def __init__(self, where: str, source: str, parts: list[Part]) -> None:
        self.where, self.source = where, source
        self.pattern, self.names = opening(parts)
        self.generic = opening(parts, generic_names=True)[0] if self.names else None
        self.id = where + (f" ({', '.join(self.names)})" if self.names else "")

    def quoted_in(self, text: str) -> bool:
        if re.search(self.pattern, text):
            return True
        if self.generic is None:
            return False
        # every resolved name listed after a quote of the same message for another name
        return all(re.search(self.generic + ALSO + re.escape(name) + "`", text) for name in self.names)


def error_call(node: ast.AST) -> ast.expr | None:
    """The message of a call of an exception class, or None for another node (or a ``SystemExit`` status)."""
    if not isinstance(node, ast.Call):
        return None
    name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
    if name not in ERRORS:
        return None
    text = node.args[0] if node.args else None
    if name == "SystemExit" and not (isinstance(text, ast.JoinedStr) or isinstance(getattr(text, "value", 0), str)):
        return None  # an exit status, not a message
    assert node.args, f"line {node.lineno}: an error without a message"
    return node.args[0]


class Definitions:
    """Where each function of the package is defined, and with which constant arguments it is called."""

    def __init__(self, modules: dict[str, ast.Module]) -> None:
        self.defined: dict[str, list[tuple[str, ast.FunctionDef, bool]]] = {}  # called name -> (module, def, method)
        self.calls: dict[str, list[tuple[str, ast.Call]]] = {}
        for module, tree in modules.items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef):
                            static = any(getattr(d, "id", None) == "staticmethod" for d in item.decorator_list)
                            called = node.name if item.name == "__init__" else item.name
                            self.defined.setdefault(called, []).append((module, item, not static))
                elif isinstance(node, ast.Call):
                    name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                    if name is not None:
                        self.calls.setdefault(name, []).append((module, node))
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    self.defined.setdefault(node.name, []).append((module, node, False))

    def environments(self, module: str, function: ast.FunctionDef) -> list[dict[str, Any]]:
        """One binding of ``function``'s parameters to constants per call of it (one empty binding if unknown)."""
        entry = next(((m, f, method) for m, f, method in self.defined.get(function.name, []) if f is function), None)
        called = function.name
        if entry is None:  # a nested function, or an __init__: find it under the name it is called by
            entry = next(
                ((m, f, method, name) for name, defs in self.defined.items() for m, f, method in defs if f is function),
                None,
            )
            if entry is None:
                return [{}]
            called = entry[3]
        _, _, method = entry[:3]
        definitions = self.defined[called]
        same_module = len(definitions) > 1
        if same_module and sum(m == module for m, _, _ in definitions) > 1:
            return [{}]  # several definitions of that name in one module: the calls cannot be told apart
        arguments = function.args
        every = [a.arg for a in [*arguments.posonlyargs, *arguments.args]]
        positional = every[1 if method else 0 :]
        defaults = dict(zip(every[len(every) - len(arguments.defaults) :], arguments.defaults, strict=True))
        keywords = zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
        defaults |= {a.arg: d for a, d in keywords if d is not None}
        envs = []
        for calling_module, call in self.calls.get(called, []):
            if same_module and calling_module != module:
                continue
            env: dict[str, Any] = {}
            given = set()
            for name, value in zip(positional, call.args, strict=False):  # a call may give fewer
                if isinstance(value, ast.Starred):
                    given = set(positional) | set(defaults)
                    break
                given.add(name)
                if isinstance(value, ast.Constant):
                    env[name] = value.value
            for keyword in call.keywords:
                if keyword.arg is None:  # **kwargs
                    given = set(positional) | set(defaults)
                    continue
                given.add(keyword.arg)
                if isinstance(keyword.value, ast.Constant):
                    env[keyword.arg] = keyword.value.value
            for name, default in defaults.items():
                if name not in given and isinstance(default, ast.Constant):
                    env[name] = default.value
            envs.append(env)
        return [{}, *envs]  # unbound too: a call may pass what the calls here do not


def stored_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


class Collector:
    """Runs through a function's statements with what is known of its variables, recording every message built."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.found: dict[tuple[str, str], Message] = {}
        self.calls: set[int] = set()  # the error calls seen, by id

    def expressions(self, node: ast.AST, env: dict[str, Any]) -> None:
        for child in ast.walk(node):
            message = error_call(child)
            if message is not None:
                assert isinstance(child, ast.Call)
                self.calls.add(id(child))
                parts = message_parts(message, env)
                where = f"{self.module}:{child.lineno}"
                found = Message(where, ast.unparse(message), parts)
                self.found.setdefault((where, found.id + found.pattern), found)

    def statements(self, body: list[ast.stmt], env: dict[str, Any]) -> None:
        env = dict(env)
        for statement in body:
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
                continue  # collected on its own
            if isinstance(statement, ast.ClassDef):
                self.statements(statement.body, {})
                continue
            if isinstance(statement, ast.For) and isinstance(statement.target, ast.Name):
                self.expressions(statement.iter, env)
                values = evaluate(statement.iter, env)
                inner = {k: v for k, v in env.items() if k not in stored_names(statement)}
                if values is UNKNOWN or not isinstance(values, list | tuple):
                    self.statements(statement.body, inner)
                else:
                    for value in values:
                        self.statements(statement.body, inner | {statement.target.id: value})
                self.statements(statement.orelse, env)
            elif isinstance(statement, ast.If) and holds(statement.test, env) is not None:
                self.expressions(statement.test, env)
                self.statements(statement.body if holds(statement.test, env) else statement.orelse, env)
            elif any(isinstance(v, list) and v and isinstance(v[0], ast.stmt) for _, v in ast.iter_fields(statement)):
                inner = {k: v for k, v in env.items() if k not in stored_names(statement)}
                for _, value in ast.iter_fields(statement):  # a compound statement: its parts, then its blocks
                    values = value if isinstance(value, list) else [value]
                    if values and isinstance(values[0], ast.stmt):
                        self.statements(values, inner)
                    elif values and isinstance(values[0], ast.ExceptHandler | ast.match_case):
                        for handler in values:
                            self.statements(handler.body, inner)
                    else:
                        for item in values:
                            if isinstance(item, ast.AST):
                                self.expressions(item, env)
            else:
                self.expressions(statement, env)
                if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
                    value = evaluate(statement.value, env)
                    for target in statement.targets:
                        assert isinstance(target, ast.Name)
                        if value is UNKNOWN:
                            env.pop(target.id, None)
                        else:
                            env[target.id] = value
                    continue
            for name in stored_names(statement):  # assigned in a way not followed: unknown from here on
                env.pop(name, None)


def raised_messages() -> list[Message]:
    """Every message of an error built in ``lightning_tbptt/*.py``, once per way its fields are fixed."""
    modules = {path.name: ast.parse(path.read_text()) for path in sorted((ROOT / "lightning_tbptt").glob("*.py"))}
    CONSTANTS.update(module_constants(modules))
    definitions = Definitions(modules)
    found: list[Message] = []
    for module, tree in modules.items():
        collector = Collector(module)
        collector.statements(tree.body, {})
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for env in definitions.environments(module, node):  # type: ignore[arg-type]
                    collector.statements(node.body, env)
        every_call = {id(node) for node in ast.walk(tree) if error_call(node) is not None}
        assert every_call <= collector.calls, f"{module}: an error built where the statements were not followed"
        found += sorted(collector.found.values(), key=lambda m: (int(m.where.split(":")[1]), m.id))
    return found


MESSAGES = raised_messages()


def page_text(text: str | None = None) -> str:
    return " ".join((PAGE.read_text() if text is None else text).split())


def unnumbered(message_id: str) -> str:
    """A message's id without its line number (``demo.py:174 (--lanes)`` -> ``demo.py (--lanes)``), which edits move."""
    return re.sub(r":\d+", "", message_id, count=1)


def unquoted(text: str) -> list[str]:
    """The messages (by id) that no entry of ``text`` (the page, whitespace collapsed) quotes."""
    return [message.id for message in MESSAGES if not message.quoted_in(text)]


# --------------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------------


def test_the_messages_are_found():
    assert len(MESSAGES) > 80
    assert all(message.pattern.strip() for message in MESSAGES)
    ids = {unnumbered(message.id) for message in MESSAGES}
    # a message written once for several arguments counts once per argument, from the calls of its function
    assert {f"config.py ({name})" for name in ("segment_length", "stride", "truncated_bptt_steps")} <= ids
    assert {"data.py (lanes)", "data.py (target_shift)", "data.py (num_workers)"} <= ids
    assert "fields.py (resets)" in ids
    # and once per flag of a loop over flags
    assert {"demo.py (--max-steps)", "demo.py (--embedding-size)"} <= ids
    assert any(message.source.startswith("'error: argument --resume") for message in MESSAGES)


@pytest.mark.parametrize("message", MESSAGES, ids=[m.id for m in MESSAGES])
def test_every_raised_error_has_an_entry(message):
    assert message.quoted_in(page_text()), (
        f"{message.id}: no entry in docs/troubleshooting.md quotes {message.source[:120]}"
    )


def test_errors_are_found_however_they_are_called():
    code = """
def check(value, argument):
    if value < 1:
        raise errors.BatchError(f"Expected `{argument}` to be positive but got {value}.")
def run():
    check(lanes, "lanes")
    raise NotImplementedError("Not written yet.")
def main():
    for flag in ["--a", "--b"]:
        raise SystemExit(f"error: argument {flag}: expected a positive integer, got {value}")
    raise SystemExit(2)
"""
    tree = ast.parse(code)
    collector = Collector("example.py")
    definitions = Definitions({"example.py": tree})
    for node in tree.body:
        assert isinstance(node, ast.FunctionDef)
        for env in definitions.environments("example.py", node):
            collector.statements(node.body, env)
    assert sorted(m.id for m in collector.found.values()) == [
        "example.py:10 (--a)",
        "example.py:10 (--b)",
        "example.py:4",
        "example.py:4 (lanes)",
        "example.py:7",
    ]


ENTRIES = {
    # a bullet of the page, by its opening, and a message only it quotes
    "* ``Expected argument `segment_length` to be a positive integer": "config.py (segment_length)",
    "* ``Expected argument `lanes` to be a positive integer": "data.py (lanes)",
    "* ``Expected argument `lengths` to be a key, an index": "fields.py (resets)",
    "* ``error: argument --max-steps: expected a positive integer": "demo.py (--val-every)",
    "* ``error: argument --resume: no checkpoint at": "demo.py",
}


@pytest.mark.parametrize(("entry", "message"), ENTRIES.items(), ids=list(ENTRIES.values()))
def test_a_missing_entry_is_noticed(entry, message):
    """Removing a real entry from the page leaves its message unquoted."""
    text = PAGE.read_text()
    start = text.index(entry)
    end = text.find("\n*", start + 1)
    end = min(e for e in (end, text.find("\n\n", start)) if e != -1)
    missing = set(unquoted(page_text(text[:start] + text[end:]))) - set(unquoted(page_text(text)))
    assert message in {unnumbered(id_) for id_ in missing}
