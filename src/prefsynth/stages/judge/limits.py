"""The budget of one rubric render, and the size estimates checked before work is done.

A rubric template can ask for gigabytes in a single call (``'a'|center(10**9)``,
``'%1000000000d' % 1``, ``'{:>1000000000}'.format(1)``, ``'a' * 10**9``, ``2 ** 64 ** 64 ...``)
or spend forever in small steps (nested ``range(100000)`` loops, a string doubled forty times).
Checking a result's size *after* the call is too late for the first kind, so every operation
that can amplify its input estimates the result first (:func:`need`), and every result is
charged to a per-render :class:`Budget` of characters and steps with a wall-clock deadline
(:func:`account`, :func:`counted`). :mod:`prefsynth.stages.judge.sandbox` wires these into
Jinja's operators, calls, filters and output.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import pass_environment, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS as JINJA_FILTERS
from jinja2.runtime import LoopContext
from markupsafe import soft_str

CHARS = 4_000_000  #: characters (or items) one render may produce, plus 4x its inputs' size
STEPS = 1_000_000  #: loop iterations, calls, operators and outputs, plus 1x its inputs' size
SECONDS = 5.0  #: wall-clock limit of one render
MAX_INT_BITS = 10_000  #: largest integer a template may compute (about 3,000 digits)
_HUGE = 10**12
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


class RenderLimit(Exception):
    """A render went past its budget of characters, steps, time or call depth."""


@dataclass(slots=True)
class Budget:
    """What one render may still spend. ``chars`` counts every result and output chunk, so
    text buffered by ``{% set %}``, macros or ``{% filter %}`` is bounded too."""

    chars: int
    steps: int
    deadline: float
    chars_limit: int
    steps_limit: int
    seconds: float
    depth: int = 0

    @classmethod
    def for_inputs(cls, variables: Mapping[str, Any]) -> Budget:
        """Scaled to the inputs, so a long prompt is never mistaken for a bomb."""
        size = size_of(list(variables.values()))
        chars, steps = CHARS + 4 * size, STEPS + size
        return cls(chars, steps, time.monotonic() + SECONDS, chars, steps, SECONDS)

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise RenderLimit(f"more than {self.steps_limit:,} steps (a loop or recursion "
                              "that does not end soon)")
        if not self.steps & 1023:
            self.check_clock()

    def check_clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise RenderLimit(f"rendering took longer than {self.seconds:g} s")

    def allow(self, size: int, what: str) -> None:
        if size > self.chars:
            raise RenderLimit(f"{what} would make about {size:,} characters; {self.chars:,} "
                              f"of this render's {self.chars_limit:,} are left")

    def charge(self, size: int, what: str) -> None:
        """Count a result made (or about to be printed); big results take time to make, so
        the deadline is checked here too, not only every 1024 steps."""
        self.allow(size, what)
        self.chars -= size
        if size > 10_000:
            self.check_clock()


_CURRENT: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("rubric_budget",
                                                                         default=None)


@contextlib.contextmanager
def spending(budget: Budget) -> Iterator[Budget]:
    """Make ``budget`` the one :func:`current` returns while a template renders."""
    token = _CURRENT.set(budget)
    try:
        yield budget
    finally:
        _CURRENT.reset(token)


def current() -> Budget:
    """The running render's budget. Outside a render (Jinja folding a constant at compile
    time) this raises, so no template code runs unbudgeted."""
    budget = _CURRENT.get()
    if budget is None:
        raise RuntimeError("no rubric render in progress")
    return budget


def size_of(obj: Any, limit: int = _HUGE) -> int:
    """About how many characters ``str(obj)`` takes (at least one per container item),
    counted without building it; stops early once past ``limit``. A list holding the same
    big list twice counts it twice: that is what printing it costs."""
    if type(obj) is str:
        return len(obj)
    total = 0
    stack = [obj]
    while stack and total <= limit:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, int):
            total += x.bit_length() // 3 + 1
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += len(x) + 1
            stack.extend(x)
        elif isinstance(x, dict):
            total += len(x) + 1
            stack.extend(x.keys())
            stack.extend(x.values())
        else:
            total += 1
    return total


def account(value: Any, what: str) -> Any:
    """Charge a result to the budget; an iterator is charged step by step as it is read."""
    kind = type(value)
    if kind is int:
        if value.bit_length() > MAX_INT_BITS:
            raise RenderLimit(f"{what} made an integer of more than {MAX_INT_BITS} bits")
        return value
    if kind is bool or kind is float or value is None:
        return value
    if kind is not str and isinstance(value, Iterator) and not isinstance(value, LoopContext):
        return counted(value)
    budget = current()
    budget.charge(size_of(value, budget.chars), what)
    return value


def counted(items: Iterable[Any]) -> Iterator[Any]:
    """``items``, one step per item."""
    budget = current()
    for item in items:
        budget.step()
        yield item


def need(size: int, what: str) -> None:
    """Refuse an operation estimated to make more than the budget has left."""
    current().allow(size, what)


def width_arg(value: Any) -> int:
    """A width argument as a number; a non-int is left for the real call to reject."""
    return value if isinstance(value, int) else 0


def _digits(run: str | None) -> int:
    return (int(run) if len(run) < 10 else _HUGE) if run else 0


def check_percent(fmt: str, args: Any) -> None:
    """``fmt % args``: refuse ``*`` widths (taken from the arguments) and estimate the result;
    ``%(name)s`` may repeat an argument, so each conversion counts as the biggest one."""
    values = list(args.values()) if isinstance(args, Mapping) else (
        list(args) if isinstance(args, tuple) else [args])
    biggest = max((size_of(v) for v in values), default=0)
    total = len(fmt)
    for m in _PERCENT.finditer(fmt):
        width, precision, conv = m.groups()
        if conv == "%":
            continue
        if "*" in (width, precision):
            raise SecurityError("'*' widths are not allowed in % formats")
        total += _digits(width) + _digits(precision)
        total += biggest * (10 if conv in ("r", "a") else 1)  # repr escapes
    need(total, "a % format")


def check_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """``fmt.format(...)``: refuse nested ``{}`` in a spec (a width taken from the arguments)
    and estimate the result; ``{0}{0}{0}`` repeats an argument, so each field counts as the
    biggest one."""
    biggest = max((size_of(v) for v in (*args, *kwargs.values())), default=0)
    total = len(fmt)
    for _, field, spec, conv in string.Formatter().parse(fmt):
        if field is None:
            continue
        if spec and "{" in spec:
            raise SecurityError("nested {} in a format spec are not allowed")
        total += sum(_digits(d) for d in re.findall(r"\d+", spec or ""))
        total += biggest * (10 if conv in ("r", "a") else 1)
    need(total, "str.format")


def check_replace(s: Any, old: Any, new: Any, count: Any) -> None:
    """``s.replace(old, new, count)``: each hit adds ``new`` (``old == ""`` hits everywhere)."""
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        hits = len(s) + 1 if old == "" else s.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        need(len(s) + hits * len(new), "replace")


def joined(sep: str, items: Iterable[Any]) -> list[Any]:
    """``items`` as a list, once ``sep.join(items)`` is known to fit."""
    listed = list(items)
    need(size_of(listed) + len(sep) * max(len(listed) - 1, 0), "join")
    return listed


def check_binop(operator: str, left: Any, right: Any) -> None:
    """``*`` repeating a sequence or ``**``/``*`` growing an integer, estimated first."""
    if operator == "**":
        if (isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1
                and left.bit_length() * right > MAX_INT_BITS):
            raise RenderLimit(f"'**' would make an integer of more than {MAX_INT_BITS} bits")
    elif operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                need(size_of(seq) * times, "'*'")
        if isinstance(left, int) and isinstance(right, int) and (
                left.bit_length() + right.bit_length() > MAX_INT_BITS):
            raise RenderLimit(f"'*' would make an integer of more than {MAX_INT_BITS} bits")
    elif operator == "+" and isinstance(left, (str, list, tuple)):
        need(size_of(left) + size_of(right), "'+'")
    elif operator == "%" and isinstance(left, str):
        check_percent(left, right)


def check_str_method(s: str, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
                     ) -> tuple[Any, ...]:
    """Estimate ``s.<name>(*args)`` for the methods that can grow a string; returns the
    arguments to call with (``join``'s iterable read into a list to be measured)."""
    if not args:
        return args
    if name in ("center", "ljust", "rjust", "zfill"):
        need(max(len(s), width_arg(args[0])), f"str.{name}")
    elif name == "replace":
        check_replace(s, args[0], args[1] if len(args) > 1 else "",
                      args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "join":
        return (joined(s, args[0]), *args[1:])
    return args


# --- filters: the amplifying ones estimate first, then every one is counted -------------


def _center(value: Any, width: int = 80) -> str:
    need(max(size_of(value), width_arg(width)), "center")
    return JINJA_FILTERS["center"](value, width)  # type: ignore[no-any-return]


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = soft_str(s)
    pad = len(width) if isinstance(width, str) else width_arg(width)
    need(len(text) + (text.count("\n") + 2) * pad, "indent")
    return JINJA_FILTERS["indent"](text, width, first, blank)  # type: ignore[no-any-return]


@pass_environment
def _wordwrap(environment: Any, s: Any, width: int = 79, break_long_words: bool = True,
              wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text = soft_str(s)
    wrap = environment.newline_sequence if wrapstring is None else soft_str(wrapstring)
    need(len(text) * (1 + len(wrap)), "wordwrap")
    return JINJA_FILTERS["wordwrap"](  # type: ignore[no-any-return]
        environment, text, width, break_long_words, wrapstring, break_on_hyphens)


@pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    return JINJA_FILTERS["join"](  # type: ignore[no-any-return]
        eval_ctx, joined(soft_str(d), value), d, attribute)


@pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> str:
    check_replace(soft_str(s), soft_str(old), soft_str(new), count)
    return JINJA_FILTERS["replace"](eval_ctx, s, old, new, count)  # type: ignore[no-any-return]


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    check_percent(soft_str(value), kwargs or args)
    return JINJA_FILTERS["format"](value, *args, **kwargs)  # type: ignore[no-any-return]


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    if fill_with is not None:  # the last batch is padded to linecount items
        need(width_arg(linecount), "batch")
    return JINJA_FILTERS["batch"](value, linecount, fill_with)


@pass_eval_context
def _tojson(eval_ctx: Any, value: Any, indent: int | None = None) -> str:
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= 4):
        raise SecurityError("tojson indent must be 0..4")
    need(size_of(value) * (2 + (indent or 0) * 8), "tojson")
    return JINJA_FILTERS["tojson"](eval_ctx, value, indent)  # type: ignore[no-any-return]


@pass_environment
def _sum(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    if isinstance(start, bool) or not isinstance(start, (int, float)):
        raise SecurityError("sum adds numbers only")  # list + list + ... is quadratic
    return JINJA_FILTERS["sum"](environment, iterable, attribute, start)


def _round(value: Any, precision: int = 0, method: str = "common") -> float:
    if not (isinstance(precision, int) and -400 <= precision <= 400):
        raise SecurityError("round precision must be -400..400")  # 'ceil' computes 10**p
    return JINJA_FILTERS["round"](value, precision, method)  # type: ignore[no-any-return]


_ESTIMATED = {"center": _center, "indent": _indent, "wordwrap": _wordwrap, "join": _join,
              "replace": _replace, "format": _format, "batch": _batch, "tojson": _tojson,
              "sum": _sum, "round": _round}
# Of no use to a rubric, and nondeterministic (random: the request key hashes the prompt)
# or regex-heavy on adversarial input.
_DROPPED = {"random", "urlize", "xmlattr", "pprint", "striptags"}


def _counting(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)  # keeps Jinja's pass_context/-environment marker
    def filter_(*args: Any, **kwargs: Any) -> Any:
        current().step()
        return account(func(*args, **kwargs), f"the {name} filter")
    return filter_


#: Jinja's filters, each counted, the amplifying ones estimated first.
FILTERS: dict[str, Callable[..., Any]] = {
    name: _counting(name, _ESTIMATED.get(name, f))
    for name, f in JINJA_FILTERS.items() if name not in _DROPPED}
