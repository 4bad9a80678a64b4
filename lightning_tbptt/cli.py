"""One-line errors for ``LightningCLI`` configs of the library's classes: ``class CLI(OneLineErrors, LightningCLI)``.

A plain ``LightningCLI`` reports a bad value of ``TBPTTCallback`` in jsonargparse's words: a value outside its type
(``step_per: bad``) as a nested report of every class it tried for ``trainer.callbacks``, and a value the callback
itself refuses (``segment_length: 0``) as a traceback. With :class:`OneLineErrors` in front of ``LightningCLI`` (of
either namespace), both end in the usage and one line, exit status 2, as a bad command-line flag does::

    error: Expected argument `step_per` of `TBPTTCallback` to be one of 'segment', 'batch' or None but got bad.
    error: Expected argument `segment_length` to be a positive integer but got 0. Pass the number of ...

Every other error is reported as ``LightningCLI`` reports it. The first line is read off jsonargparse's report
(tested with jsonargparse 4.53); a report it cannot read is shown as it is.

Example:
    >>> report = '''Parser key "trainer.callbacks":
    ...   Errors:
    ...     - Problem with given class_path 'lightning_tbptt.TBPTTCallback':
    ...         Parser key "step_per":
    ...           Errors:
    ...             - Expected a typing.Literal['segment', 'batch']
    ...             - Expected a <class 'NoneType'>
    ...           Given value: bad
    ...     - Problem with given class_path 'pytorch_lightning.Callback':
    ...         Option 'step_per' is not accepted'''
    >>> print(condensed(report))
    Expected argument `step_per` of `TBPTTCallback` to be one of 'segment', 'batch' or None but got bad.

"""

import re
from collections.abc import Callable
from typing import Any

from lightning_tbptt.errors import TBPTTError

__all__ = ["OneLineErrors", "condensed"]

_HEADER = re.compile(r"^(?P<indent>\s*)- Problem with given class_path '(?P<path>lightning_tbptt\.[\w.]+)':\s*$")
_KEY = re.compile(r'Parser key "(?P<key>[\w.]+)":')
# "- Expected a T" in a union's errors, "Expected a T. Got value: V" alone
_EXPECTED = re.compile(r"Expected a (?P<type>.+?)(?:\. Got value: .*)?\s*$")
_GIVEN = re.compile(r"(?:Given|Got) value: (?P<value>.*?)\s*$")


def _in_words(annotation: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", annotation)
    if literal:
        return f"one of {literal.group(1)}"
    named = re.fullmatch(r"<class '(?:\w+\.)*(\w+)'>", annotation)
    if named:
        name = named.group(1)
        return "None" if name == "NoneType" else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return annotation


def condensed(report: str) -> str:
    """The first bad value of a ``lightning_tbptt`` class in jsonargparse's ``report`` in one line, else ``report``."""
    lines = report.splitlines()
    for index, line in enumerate(lines):
        header = _HEADER.match(line)
        if header is None:
            continue
        depth = len(header["indent"])
        body = []
        for each in lines[index + 1 :]:
            if len(each) - len(each.lstrip()) <= depth:
                break
            body.append(each)
        keys = [found for each in body if (found := _KEY.search(each))]
        expected = [_in_words(found["type"]) for each in body if (found := _EXPECTED.search(each))]
        given = [found for each in body if (found := _GIVEN.search(each))]
        if keys and expected and given:
            owner = header["path"].rsplit(".", 1)[-1]
            return (
                f"Expected argument `{keys[0]['key']}` of `{owner}` to be {' or '.join(expected)} but got"
                f" {given[0]['value']}."
            )
    return report


def _library_error(error: BaseException) -> TBPTTError | None:
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, TBPTTError):
        cause = cause.__cause__ or cause.__context__
    return cause


class OneLineErrors:
    """Put in front of ``LightningCLI`` (of either namespace): bad values of the library's classes end in one line.

    ``class CLI(OneLineErrors, LightningCLI): pass``, then ``CLI(MyModel, MyData)`` where ``LightningCLI(MyModel,
    MyData)`` was. A value outside its type is reported by the parser with the line :func:`condensed` reads off
    jsonargparse's report; an error of the library raised while the CLI builds the classes (a ``TBPTTError``: a value
    the callback refuses) is reported by the parser too, with the library's own message. Both exit with status 2.
    """

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as ``LightningCLI`` does, the parsers' errors about the library's classes condensed to one line."""
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.error = _condensing(each.error)  # an instance attribute, in front of the class's method
        try:
            base: Any = super()
            base.parse_arguments(parser, args)
        finally:
            for each in parsers:
                vars(each).pop("error", None)

    def instantiate_classes(self) -> None:
        """Build the classes as ``LightningCLI`` does; the library's refusal of a value is a parser error."""
        try:
            base: Any = super()
            base.instantiate_classes()
        except Exception as error:
            refusal = _library_error(error)
            if refusal is None:
                raise
            parser: Any = getattr(self, "parser")  # noqa: B009  # set by LightningCLI before it builds the classes
            parser.error(str(refusal))


def _condensing(error: Callable[..., Any]) -> Callable[..., Any]:
    def condensing(message: str, *args: Any, **kwargs: Any) -> Any:
        return error(condensed(message), *args, **kwargs)

    return condensing
