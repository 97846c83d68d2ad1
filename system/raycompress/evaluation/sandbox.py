"""Task templates rendered in a bounded Jinja sandbox: no Python internals, and a budget per render.

A task file is data from anyone, so a template may only format its item. Jinja's
`ImmutableSandboxedEnvironment` refuses attribute walks to Python internals and mutation; on top
of it every render has a budget:

- time: `RENDER_SECONDS` of wall time, checked on every line the compiled template runs and on
  every Python call it makes (nested loops over `range` or long strings stop there);
- size: no value a template builds, and not its output, may be longer than the item's own size
  (`item_size`) plus `EXTRA_CHARS`; the operations that grow a value faster than a loop step
  (`*`, `+`, `%`, `~`, `**`, str.replace / join / ljust / format..., the filters center, indent,
  join, replace, wordwrap, format, batch, slice, sum) are checked *before* they run, so
  `'a' * 10**9` never allocates;
- nesting: at most `MAX_DEPTH` calls deep (a macro calling itself), and no include or import.

`render` turns every failure (syntax, undefined field, sandbox refusal, budget, and any other
exception the template raises) into one TaskError line: "<where>: <what> (<short reason>)".
"""
from __future__ import annotations

import inspect
import re
import string
import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache, update_wrapper
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import TemplateNotFound
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from raycompress.evaluation.taskfiles import TaskError

RENDER_SECONDS = 2.0
EXTRA_CHARS = 1 << 20  # 1 MiB beyond the item's own size
MAX_DEPTH = 64
MAX_INT_BITS = 1 << 16  # integers a template builds: 65,536 bits (~19,700 digits)
_TEMPLATE_FILE = "<template>"  # the filename Jinja compiles `from_string` templates under


class BudgetError(Exception):
    """A render went past its budget (time, size or nesting)."""


@dataclass
class _Budget:
    deadline: float
    chars: int
    depth: int = 0
    tripped: str | None = None  # set when over budget, in case the template swallowed the error

    def over(self, reason: str) -> BudgetError:
        self.tripped = self.tripped or reason
        return BudgetError(reason)


_LOCAL = threading.local()


def _budget() -> _Budget:
    b = getattr(_LOCAL, "budget", None)
    return b if b is not None else _Budget(time.monotonic() + RENDER_SECONDS, EXTRA_CHARS)


def _fit(n: Any, what: str) -> None:
    b = _budget()
    if isinstance(n, int) and n > b.chars:
        raise b.over(f"{what} would hold {n:,} characters or items, over the {b.chars:,} allowed")


def _length(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0


def _check_int(a: int, b: int, op: str) -> None:
    bits = b * max(abs(a).bit_length(), 1) if op == "**" else a.bit_length() + b.bit_length()
    if bits > MAX_INT_BITS and (op != "**" or abs(a) > 1):
        raise _budget().over(f"'{op}' would make an integer of about {bits:,} bits, over {MAX_INT_BITS:,}")


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args: Any) -> None:
    """`fmt % args`: widths and precisions (written, or `*` taken from args) within the budget."""
    values = args if isinstance(args, tuple) else (args,)
    for m in _PERCENT.finditer(fmt):
        for g in m.groups():
            if g == "*":
                for v in values:
                    if isinstance(v, int):
                        _fit(v, "a '%*' width")
            elif g:
                _fit(int(g), f"the format width '{m.group(0)}'")


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt.format(...)`: numbers in each field's spec within the budget; a spec built from
    arguments (`{:>{w}}`) limits every integer argument."""
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if not spec:
            continue
        for n in re.findall(r"\d+", spec):
            _fit(int(n), f"the format spec '{spec}'")
        if "{" in spec:
            for v in (*args, *kwargs.values()):
                if isinstance(v, int):
                    _fit(v, "a nested format width")


def _check_binop(op: str, a: Any, b: Any) -> None:
    if isinstance(a, int) and isinstance(b, int) and op in ("*", "**"):
        _check_int(a, b, op)
    elif op == "*" and isinstance(b, int) and _length(a) or op == "*" and isinstance(a, int) and _length(b):
        _fit(_length(a) * b if isinstance(b, int) else a * _length(b), "a repeated value ('*')")
    elif op == "+":
        _fit(_length(a) + _length(b), "a joined value ('+')")
    elif op == "%" and isinstance(a, str):
        _check_percent(a, b)


def _joined(sep: Any, items: list) -> int:
    return _length(sep) * max(len(items) - 1, 0) + sum(map(_length, items))


def _items(x: Any) -> list:
    return x if isinstance(x, (list, tuple, str)) else list(x)


# str / bytes methods that can return far more than they were given: (self, args) -> the result's length
_METHODS: dict[str, Callable[[Any, tuple], int]] = {
    "replace": lambda s, a: len(s) + (s.count(a[0]) if a[0] else len(s) + 1) * _length(a[1]),
    "join": lambda s, a: _joined(s, _items(a[0])),
    "ljust": lambda s, a: a[0], "rjust": lambda s, a: a[0], "center": lambda s, a: a[0],
    "zfill": lambda s, a: a[0],
    "expandtabs": lambda s, a: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * (a[0] if a else 8),
    "translate": lambda s, a: len(s) * max([_length(v) for v in getattr(a[0], "values", list)()] + [1]),
}


def _indent(v: dict) -> int:
    w = v.get("width", 4)
    return len(v["s"]) + (str(v["s"]).count("\n") + 1) * (w if isinstance(w, int) else _length(w))


def _sum(v: dict) -> int:
    start = v.get("start", 0)
    if not isinstance(start, (str, bytes, list, tuple)):
        return 0
    v["iterable"] = _items(v["iterable"])
    return _length(start) + sum(map(_length, v["iterable"]))


def _join(v: dict) -> int:
    v["value"] = _items(v["value"])
    return _joined(v.get("d", ""), v["value"])


# filters that can return far more than they were given: bound arguments -> the result's length
_FILTERS: dict[str, Callable[[dict], int]] = {
    "center": lambda v: v.get("width", 80),
    "indent": _indent,
    "join": _join,
    "replace": lambda v: _METHODS["replace"](str(v["s"]), (str(v["old"]), str(v["new"]))),
    "wordwrap": lambda v: len(v["s"]) * (1 + len(v.get("wrapstring") or "\n")),
    "batch": lambda v: v.get("linecount", 0) if v.get("fill_with") is not None else 0,
    "slice": lambda v: v.get("slices", 0),
    "sum": _sum,
}


def _predict(rule: Callable, *args) -> int:
    """A rule's predicted length; 0 where the arguments are wrong (the call itself then says so)."""
    try:
        return rule(*args)
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        return 0


def _guarded_filter(name: str, f: Callable) -> Callable:
    """Filter `name` with its `_FILTERS` rule (or the `%` check for `format`) run before it."""
    inner = getattr(f, "__wrapped__", f)  # an async_variant adds an eval_ctx its sync filter lacks
    skip = 1 if hasattr(f, "jinja_pass_arg") and not hasattr(inner, "jinja_pass_arg") else 0
    sig, predict = inspect.signature(inner), _FILTERS.get(name)

    def guarded(*args, **kwargs):
        _on_time()
        try:
            ba = sig.bind(*args[skip:], **kwargs)
        except TypeError:
            return f(*args, **kwargs)  # let the filter name its own wrong arguments
        values = {**ba.arguments, **ba.arguments.get("kwargs", {})}
        if name == "format":
            _check_percent(str(values["value"]), tuple(values.get("args", ())) or values.get("kwargs"))
        else:
            _fit(_predict(predict, values), f"the filter '{name}'")
            ba.arguments.update({k: values[k] for k in ba.arguments if k in values})
        return f(*args[:skip], *ba.args, **ba.kwargs)

    return update_wrapper(guarded, f)


def _on_time() -> _Budget:
    b = _budget()
    if time.monotonic() > b.deadline:
        raise b.over(f"ran past {RENDER_SECONDS:g} s")
    return b


def _tracer(frame, event, arg):
    """sys.settrace hook while a template with loops renders: the deadline on every Python call,
    and line by line in the template's own code (a loop whose body calls nothing)."""
    _on_time()
    return _tracer if frame.f_code.co_filename == _TEMPLATE_FILE else None


class _NoLoader(jinja2.BaseLoader):
    def get_source(self, environment, template):
        raise TemplateNotFound(template, f"a task template cannot include, import or extend '{template}'")


class _Generator(CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b` through the bounded concat
        self.write("concat(map(str, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(")))")


def _concat(pieces) -> str:
    """The environment's `concat` (a template's output, `{% set %}` blocks, macro bodies, `~`):
    "".join within the size budget, on time."""
    out, n, b = [], 0, _budget()
    for p in pieces:
        _on_time()
        n += len(p)
        if n > b.chars:
            raise b.over(f"the text would pass {b.chars:,} characters")
        out.append(p)
    return "".join(out)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the budget checks of this module in its hooks (binary
    operators, calls, str.format) and in the filters that can grow a value (see `_FILTERS`)."""

    code_generator_class = _Generator
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    concat = staticmethod(_concat)

    def __init__(self) -> None:
        super().__init__(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, loader=_NoLoader())
        self.globals.pop("lipsum", None)  # makes text in a loop no template step sees
        self.filters.update({n: _guarded_filter(n, f) for n, f in self.filters.items() if n in _FILTERS or n == "format"})

    def call_binop(self, context, operator, left, right):
        _on_time()
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's calling convention)
        b = _on_time()
        if b.depth >= MAX_DEPTH:
            raise b.over(f"calls nested deeper than {MAX_DEPTH}")
        owner, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)) and name in _METHODS:
            if name == "join" and args:
                args = (_items(args[0]), *args[1:])
            _fit(_predict(_METHODS[name], owner, args), f"str.{name}")
        b.depth += 1
        try:
            return super().call(__context, __obj, *args, **kwargs)
        finally:
            b.depth -= 1

    def wrap_str_format(self, value):
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        owner = value.__self__

        def checked(*args, **kwargs):
            _check_format(owner, args, kwargs)
            return fmt(*args, **kwargs)

        return update_wrapper(checked, fmt)


@lru_cache(maxsize=1)
def _environment() -> BoundedSandbox:
    return BoundedSandbox()


@lru_cache(maxsize=512)
def _template(source: str):
    """(the compiled template, whether it loops). A template without loops, macros or call blocks
    runs each of its nodes once, so the checks in the environment's hooks bound it; one with them
    is also traced line by line (slower: ~80 us a render instead of ~15 us)."""
    env = _environment()
    tree = env.parse(source)
    loops = any(True for _ in tree.find_all((nodes.For, nodes.Macro, nodes.CallBlock)))
    return env.from_string(tree), loops


def item_size(row: dict) -> int:
    """The characters of an item's text fields (strings in lists and mappings included)."""
    stack, n = [row], 0
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            n += len(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return n


def _reason(exc: BaseException, row: dict) -> str:
    """'<what> (<short reason>)' for an exception a render raised."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    if isinstance(exc, BudgetError):
        return f"template over its budget ({text})"
    if isinstance(exc, (MemoryError, RecursionError)):
        return f"template over its budget ({type(exc).__name__}: {text or 'out of memory'})"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"template syntax error (line {exc.lineno}: {text})"
    if isinstance(exc, SecurityError):
        return f"template refused by the sandbox ({text})"
    if isinstance(exc, jinja2.UndefinedError):
        return f"template names something the item lacks ({text}; the item has fields {sorted(row)})"
    if isinstance(exc, jinja2.TemplateNotFound):
        return f"template refused ({exc.message or text})"
    return f"template failed ({type(exc).__name__}: {text})"


def render(source: str, row: dict, where: str) -> str:
    """A Jinja template filled with one item's fields, in the bounded sandbox (see module doc).

    Args:
        where: names the task, item, file and field for the message ("task 't': item 3 of d.jsonl:
            field 'prompt'").
    Returns: the rendered text, at most `item_size(row) + EXTRA_CHARS` characters.
    Raises:
        TaskError: one line "<where>: <what> (<short reason>)", whatever went wrong.
    """
    budget = _LOCAL.budget = _Budget(time.monotonic() + RENDER_SECONDS, item_size(row) + EXTRA_CHARS)
    previous = sys.gettrace()
    try:
        template, loops = _template(source)
        if loops:
            sys.settrace(_tracer)
        try:
            out = template.render(**row)
        finally:
            if loops:
                sys.settrace(previous)
        if budget.tripped:  # the template caught the BudgetError itself
            raise BudgetError(budget.tripped)
        return out
    except Exception as exc:  # MemoryError and RecursionError included: every failure is one line
        raise TaskError(f"{where}: {_reason(exc, row)}") from exc
    finally:
        _LOCAL.budget = None
