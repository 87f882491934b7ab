"""The Jinja sandbox that renders rubric templates: no Python internals, bounded size and time.

Rubrics are code a user hands us, rendered once per judge request. Jinja's sandbox stops
attribute tricks (``__class__``), not resource bombs, and ``include``, ``1/0`` or a recursive
macro ended in a traceback. Here every render runs on a :class:`~.limits.Budget`:

* the template tree is rewritten so each output chunk, each ``for`` loop, each ``~`` and each
  list/tuple/dict literal and slice passes through a counting guard; output buffered by
  ``{% set %}`` blocks, macros or ``{% filter %}`` is counted too, which a cap on the final
  output alone would miss;
* operators, calls and filters are intercepted; the ones that can amplify (``*``, ``**``,
  ``%``, ``str.format``, ``center``, ``join``, ``replace``, ...) estimate their result first
  (:mod:`~prefsynth.stages.judge.limits`); only macros, ``range``, ``dict`` and a short list of
  string/list/dict methods may be called; ``include``/``import``/``extends`` are refused up
  front (a rubric is one file).

Any failure, ours or Python's, becomes one :class:`~prefsynth.errors.ConfigError` line naming
the template file and line.
"""

from __future__ import annotations

import functools
import traceback
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jinja2 import Environment, StrictUndefined, Template, meta, nodes, pass_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.runtime import BlockReference, LoopContext, Macro, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from prefsynth.errors import ConfigError
from prefsynth.stages.judge import limits
from prefsynth.stages.judge.limits import (
    Budget,
    RenderLimit,
    account,
    counted,
    current,
    size_of,
    spending,
)

MAX_DEPTH = 20  #: nested macro / recursive-loop calls
MAX_SOURCE = 1_000_000  #: characters in one template file

_STR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "endswith", "find", "index", "isalnum",
    "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric",
    "isprintable", "isspace", "istitle", "isupper", "join", "ljust", "lower", "lstrip",
    "partition", "removeprefix", "removesuffix", "replace", "rfind", "rindex", "rjust",
    "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith", "strip", "swapcase",
    "title", "upper", "zfill"})
#: Methods a template may call, by the type of the object they are bound to; nothing else
#: (``(1).to_bytes(10**9)``, ``expandtabs``, ``translate``, ``dict.fromkeys`` ... are refused).
_METHODS: tuple[tuple[type, frozenset[str]], ...] = (
    (str, _STR_METHODS),
    (list, frozenset({"count", "index", "copy"})),
    (tuple, frozenset({"count", "index"})),
    (dict, frozenset({"get", "items", "keys", "values", "copy"})),
    (int, frozenset({"bit_length"})),
    (float, frozenset({"is_integer"})),
    (LoopContext, frozenset({"cycle", "changed"})),
    (BlockReference, frozenset({"super"})),
)


# --- the guards the rewritten template tree calls -------------------------------------


@pass_context
def _emit(context: Any, value: Any) -> str:
    """One ``{{ }}`` output, counted whether it goes to the result or to a buffer
    (``{% set %}`` block, macro, ``{% filter %}``)."""
    budget = current()
    budget.step()
    if type(value) is not str:
        if type(value) is not int:  # ints are bounded by MAX_INT_BITS where they are made
            budget.allow(size_of(value, budget.chars), "printing a value")
        value = str(value)
    budget.charge(len(value), "the output")
    return value  # type: ignore[no-any-return]


@pass_context
def _static(context: Any, size: int) -> str:
    """The literal text of one output statement that may run many times (in a loop, macro
    or block): charged in one go, printed by Jinja as usual."""
    budget = current()
    budget.step()
    budget.charge(size, "the output")
    return ""


@pass_context
def _loop(context: Any, iterable: Any) -> Iterator[Any]:
    return counted(iterable)


@pass_context
def _concat(context: Any, parts: list[Any]) -> str:
    budget = current()
    budget.step()
    texts = []
    for part in parts:
        budget.allow(size_of(part, budget.chars), "'~'")
        texts.append(str(part))
    budget.charge(sum(map(len, texts)), "'~'")
    return "".join(texts)


@pass_context
def _value(context: Any, value: Any) -> Any:
    current().step()
    return account(value, "a literal or slice")


_GUARDS = {"sandbox_emit": _emit, "sandbox_static": _static, "sandbox_loop": _loop,
           "sandbox_concat": _concat, "sandbox_value": _value}


class _Guard(NodeTransformer):
    """Rewrites the template tree so output, loops, ``~``, literals and slices are counted.

    Literal text outside loops, macros and blocks is printed once, so its size is bounded by
    the file's; only text that may repeat is charged."""

    _REPEATED = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.Block)

    def __init__(self) -> None:
        self.repeated = 0

    @staticmethod
    def _wrap(node: nodes.Node, guard: str) -> nodes.Filter:
        return nodes.Filter(node, guard, [], [], None, None, lineno=node.lineno)

    def generic_visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        repeats = isinstance(node, self._REPEATED)
        self.repeated += repeats
        try:
            return super().generic_visit(node, *args, **kwargs)
        finally:
            self.repeated -= repeats

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        static = sum(len(c.data) for c in node.nodes if isinstance(c, nodes.TemplateData))
        node.nodes = [c if isinstance(c, nodes.TemplateData) else self._wrap(c, "sandbox_emit")
                      for c in node.nodes]
        if static and self.repeated:
            node.nodes.append(self._wrap(nodes.Const(static, lineno=node.lineno),
                                         "sandbox_static"))
        return node

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, "sandbox_loop")
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return self._wrap(nodes.List(node.nodes, lineno=node.lineno), "sandbox_concat")

    def _literal(self, node: nodes.Expr) -> nodes.Expr:
        self.generic_visit(node)
        return self._wrap(node, "sandbox_value")

    visit_List = visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
        return self._literal(node) if node.ctx == "load" else self.generic_visit(node)

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Expr:
        return self._literal(node) if isinstance(node.arg, nodes.Slice) else (
            self.generic_visit(node))


class _Checked:
    """A callable this module vouches for (``range``, a checked ``str.format``)."""

    __slots__ = ("fn", "name")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > limits.STEPS:
        raise RenderLimit(f"range of {len(rng):,} items (at most {limits.STEPS:,})")
    return rng


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every operator, call and filter counted or checked."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, trim_blocks=True,
                         lstrip_blocks=True, keep_trailing_newline=False, optimized=False)
        self.globals.clear()  # no cycler/joiner/lipsum/namespace to poke at
        self.globals.update(range=_Checked(_range, "range"), dict=dict)
        self.filters = {**limits.FILTERS, **_GUARDS}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        current().step()
        limits.check_binop(operator, left, right)
        return account(super().call_binop(context, operator, left, right), f"'{operator}'")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        inner = super().wrap_str_format(value)
        if inner is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            mapping = args[0] if is_map and args and isinstance(args[0], Mapping) else kwargs
            limits.check_format(fmt, () if is_map else args, mapping)
            return inner(*args, **kwargs)

        return _Checked(checked, "str.format")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.step()
        if isinstance(__obj, (Macro, LoopContext)):  # macro, caller(), recursive loop()
            if isinstance(__obj, LoopContext) and args:
                args = (counted(args[0]), *args[1:])
            budget.depth += 1
            try:
                if budget.depth > MAX_DEPTH:
                    raise RenderLimit(f"macro or loop calls nested deeper than {MAX_DEPTH}")
                return account(__context.call(__obj, *args, **kwargs), "a macro")
            finally:
                budget.depth -= 1
        if isinstance(__obj, (_Checked, BlockReference, Undefined)) or __obj is dict:
            return account(__context.call(__obj, *args, **kwargs), repr(__obj))
        owner, name = _method(__obj)
        allowed = next((names for kind, names in _METHODS if isinstance(owner, kind)), None)
        if allowed is None or name not in allowed:
            what = f"{type(owner).__name__}.{name}" if name else type(__obj).__name__
            raise SecurityError(f"calling {what} is not allowed in a rubric template")
        if isinstance(owner, str):
            args = limits.check_str_method(owner, name, args, kwargs)
        return account(__context.call(__obj, *args, **kwargs), f"{name}()")


def _method(obj: Any) -> tuple[Any, str]:
    """``(bound object, method name)`` of a bound method, else ``(None, "")``."""
    if isinstance(obj, (types.BuiltinMethodType, types.MethodType)):
        return obj.__self__, obj.__name__
    return None, ""


_ENV = Sandbox()


def _refuse_unsafe(tree: nodes.Template, origin: str) -> None:
    """Refuse other files and underscore names before compiling. A rubric is one file (and
    there is no loader), so include/import/extends could only fail later. The sandbox would
    also stop ``__class__`` at render time, but only on the branch that runs; this catches
    every branch, up front."""
    for stmt in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        keyword = {"FromImport": "from-import"}.get(type(stmt).__name__, type(stmt).__name__)
        raise ConfigError(f"template {origin} line {stmt.lineno}: {keyword.lower()} is not "
                          "allowed in a rubric (one template, one file)")
    for node in tree.find_all((nodes.Getattr, nodes.Name, nodes.Const)):
        if isinstance(node, nodes.Getattr):
            bad = node.attr if node.attr.startswith("_") else None
        elif isinstance(node, nodes.Name):
            bad = node.name if node.name.startswith("_") else None
        else:
            value = getattr(node, "value", None)
            bad = value if isinstance(value, str) and "__" in value else None
        if bad is not None:
            raise ConfigError(f"template {origin} line {node.lineno}: unsafe name {bad!r} "
                              "refused (templates may only use instruction, completions, "
                              "reference)")


#: the package's own rubrics: the sandbox's settings, none of its per-operation accounting
_TRUSTED = Environment(undefined=StrictUndefined, autoescape=False, trim_blocks=True,
                       lstrip_blocks=True, keep_trailing_newline=False)


@functools.lru_cache(maxsize=64)
def _compile_trusted(source: str, origin: str) -> Template:
    return _TRUSTED.from_string(source)


def render_trusted(source: str, origin: str, variables: dict[str, Any]) -> str:
    """Render one of the package's own templates. They loop only over the completions, so
    the sandbox's budget guards nothing there, and its accounting of every output piece was
    most of a judge request's client CPU; the text is the sandbox's, character for character
    (tested for every built-in template)."""
    try:
        return _compile_trusted(source, origin).render(**variables)
    except Exception as err:
        raise ConfigError(f"template {origin}: {_describe(err)}") from None


@functools.lru_cache(maxsize=256)
def reads_variables(source: str) -> bool:
    """Whether a template names any variable. One that names none (the built-in system
    prompt) renders the same text whatever it is given, so a caller may render it once."""
    try:
        return bool(meta.find_undeclared_variables(_ENV.parse(source)))
    except Exception:  # a syntax error: ``compile_template`` reports it in one line
        return True


@functools.lru_cache(maxsize=256)
def compile_template(source: str, origin: str) -> Template:
    """Parse, check and compile a template once; ``origin`` names it in every error."""
    if len(source) > MAX_SOURCE:
        raise ConfigError(f"template {origin}: {len(source):,} characters; the limit is "
                          f"{MAX_SOURCE:,}")
    try:
        tree = _ENV.parse(source)
        _refuse_unsafe(tree, origin)
        tree = _Guard().visit(tree)
        tree.set_environment(_ENV)
        code = _ENV.compile(tree, name=origin, filename=origin)
        return _ENV.template_class.from_code(_ENV, code, _ENV.make_globals(None))
    except TemplateSyntaxError as err:
        raise ConfigError(f"template {origin} line {err.lineno}: syntax error: "
                          f"{_one_line(err.message or '')}") from None
    except RecursionError:
        raise ConfigError(f"template {origin}: nested too deeply to compile") from None
    except Exception as err:  # e.g. an integer literal past Python's 4300-digit limit
        raise ConfigError(f"template {origin}: cannot compile: {_describe(err)}") from None


def render(template: Template, origin: str, variables: dict[str, Any]) -> str:
    """Render on a budget scaled to the inputs (see :mod:`~prefsynth.stages.judge.limits`);
    every failure is a one-line ConfigError."""
    try:
        with spending(Budget.for_inputs(variables)):
            return template.render(**variables)
    except Exception as err:  # user code: anything may go wrong, and all of it is config
        raise ConfigError(f"template {origin}{_line_of(err, origin)}: {_describe(err)}"
                          ) from None


def _describe(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "recursion too deep"
    if isinstance(err, RenderLimit):
        return f"exceeds the render limits: {err}"
    if isinstance(err, SecurityError):
        return f"refused unsafe access: {_one_line(str(err))}"
    return f"{type(err).__name__}: {_one_line(str(err))}"


def _line_of(err: BaseException, origin: str) -> str:
    """`` line N``: the innermost template line in the traceback (Jinja rewrites template
    frames to carry the template's file name and line)."""
    lines = [n for frame, n in traceback.walk_tb(err.__traceback__)
             if frame.f_code.co_filename == origin]
    return f" line {lines[-1]}" if lines else ""


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
