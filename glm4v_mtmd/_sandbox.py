"""A Jinja sandbox with bounds, for chat templates that come inside downloaded GGUF files.

Jinja's ``ImmutableSandboxedEnvironment`` already refuses access to Python internals (``__class__``,
``__globals__``, ``mro`` …), unsafe callables and mutation of the passed data, and has no loader, so
``include`` / ``import`` / ``extends`` cannot reach files. It does not bound resources: a template can
loop for hours or build gigabyte strings. This environment adds:

- **time**: rendering stops after :data:`MAX_SECONDS` (a trace function on the template's own frames
  checks a deadline on every line it executes);
- **size**: the output and every string, list or dict the template builds (locals, ``namespace``
  attributes, results of ``*``, ``+``, ``%``, ``**`` and of calls) stay under :data:`MAX_CHARS` plus
  twice the size of the conversation; integer arguments that would make ``center``, ``ljust``,
  ``zfill`` … allocate more, and format widths of 7 digits or more, are refused before the call.

A template that breaks a bound raises :class:`TemplateBoundsError`; ``chat.render_template`` turns it
(and Jinja's own ``SecurityError``) into a ``ConfigError``.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any, Optional

from jinja2.runtime import Namespace
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

#: Wall-clock limit of one rendering.
MAX_SECONDS = 5.0
#: Size limit (characters or items) of the output and of any value built, beyond the conversation's own size.
MAX_CHARS = 8 << 20

_BIG_WIDTH = re.compile(r"\d{7,}")


class TemplateBoundsError(SecurityError):
    """A chat template used more time or memory than a prompt can need."""


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """``ImmutableSandboxedEnvironment`` with time and size bounds (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *, max_chars: int = MAX_CHARS, max_seconds: float = MAX_SECONDS, **options: Any) -> None:
        super().__init__(**options)
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        env = self

        class BoundedNamespace(Namespace):
            def __setitem__(self, name: str, value: Any) -> None:
                env.check_size(value)
                super().__setitem__(name, value)

        self.globals["namespace"] = BoundedNamespace
        for name, func in list(self.filters.items()):  # `center(n)`, `indent(n)`, `format` … bypass `call`
            self.filters[name] = self._bounded_filter(func)

    def _bounded_filter(self, func: Any) -> Any:
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.check_arguments(func, args, kwargs)
            return self.check_size(func(*args, **kwargs))

        bounded.__name__ = getattr(func, "__name__", "filter")
        if hasattr(func, "jinja_pass_arg"):  # pass_context / pass_eval_context / pass_environment
            bounded.jinja_pass_arg = func.jinja_pass_arg  # type: ignore[attr-defined]
        return bounded

    def check_arguments(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse integer arguments larger than the size bound and format strings with huge widths."""
        owner = getattr(func, "__self__", None)
        for arg in (*args, *kwargs.values(), owner):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > self.max_chars:
                raise TemplateBoundsError(f"the template calls {getattr(func, '__name__', 'a function')} with {arg}")
            if isinstance(arg, str) and _BIG_WIDTH.search(arg) and ("%" in arg or "{" in arg):
                raise TemplateBoundsError("the template formats with a width of a million characters or more")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.max_chars:
            raise TemplateBoundsError(f"the template built a value of {len(value)} items (limit {self.max_chars})")
        return value

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right * max(abs(left).bit_length(), 1) > 1 << 16:
                raise TemplateBoundsError(f"the template computes {left} ** {right}")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                    raise TemplateBoundsError(f"the template repeats a value {n} times")
        if operator == "%" and isinstance(left, str) and _BIG_WIDTH.search(left):
            raise TemplateBoundsError("the template formats with a width of a million characters or more")
        return self.check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's names
        __self.check_arguments(__obj, args, kwargs)
        return __self.check_size(super().call(__context, __obj, *args, **kwargs))

    def render_bounded(self, source: str, **context: Any) -> str:
        """Render ``source`` with ``context`` under the time and size bounds."""
        template = self.from_string(source)
        code_name = "<template>"
        deadline = time.monotonic() + self.max_seconds

        def local_trace(frame: Any, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise TemplateBoundsError(f"the template ran for more than {self.max_seconds:g} s")
            if event == "line":
                for value in frame.f_locals.values():
                    self.check_size(value)
            return local_trace

        def global_trace(frame: Any, event: str, arg: Any) -> Optional[Any]:
            return local_trace if frame.f_code.co_filename == code_name else None

        previous = sys.gettrace()
        sys.settrace(global_trace)
        try:
            out: list[str] = []
            size = 0
            for piece in template.generate(**context):
                size += len(piece)
                if size > self.max_chars:
                    raise TemplateBoundsError(f"the template's output exceeds {self.max_chars} characters")
                out.append(piece)
            return "".join(out)
        finally:
            sys.settrace(previous)
