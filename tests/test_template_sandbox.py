"""Chat templates are untrusted code: the sandbox refuses internals, files, runaway time and memory.

Each hostile template below must raise ConfigError quickly and leave the process in a state where the
real templates still render. The time bound is lowered for the runaway-loop cases so the test is fast.
"""

from __future__ import annotations

import pathlib
import time

import pytest

import glm4v_mtmd._sandbox as sandbox
from glm4v_mtmd import ConfigError
from glm4v_mtmd.chat import GLM41V, render_builtin, render_template

MESSAGES = [{"role": "user", "content": "hi"}]
REAL = (pathlib.Path(__file__).parent / "data" / "chat_templates" / "glm-4.1v-thinking.jinja").read_text()

HOSTILE = {
    # Python internals
    "class-mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "function-globals": "{{ raise_exception.__globals__.os.system('id') }}",
    "cycler-init-globals": "{{ cycler.__init__.__globals__.os }}",
    "class-base": "{{ messages.__class__.__base__ }}",
    "messages-mutation": "{{ messages.append(1) }}",
    # files
    "include": "{% include '/etc/passwd' %}",
    "import": "{% import '/etc/passwd' as x %}",
    "extends": "{% extends '/etc/passwd' %}",
    # memory
    "string-repeat": "{{ 'a' * 1000000000 }}",
    "list-repeat": "{{ [0] * 1000000000 }}",
    "big-power": "{{ 10 ** 1000000000 }}",
    "center": "{{ 'x'.center(1000000000) }}",
    "center-filter": "{{ 'x' | center(1000000000) }}",
    "indent-filter": "{{ 'a\nb' | indent(1000000000) }}",
    "percent-width": "{{ '%1000000000s' % 'x' }}",
    "format-filter-width": "{{ '%1000000000s' | format('x') }}",
    "str-format-width": "{{ '{:>1000000000}'.format('x') }}",
    "namespace-doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s | length }}",
    "local-doubling": "{% set a = 'x' * 4000000 %}{% set b = a ~ a %}{% set c = b ~ b %}{% set d = c ~ c %}"
                      "{% set e = d ~ d %}{% set f = e ~ e %}{{ f | length }}",
    "output-flood": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    # time
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursive-macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    # plain errors
    "raise-exception": "{{ raise_exception('no') }}",
    "type-error": "{{ 1 + 'a' }}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_raises_config_error(name, monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_SECONDS", 0.5)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="chat template failed to render"):
        render_template(HOSTILE[name], MESSAGES, enable_thinking=None)
    assert time.monotonic() - start < 10  # bounded: nothing ran to completion
    # and the sandbox leaves nothing behind: the real template still renders the same
    assert render_template(REAL, MESSAGES, enable_thinking=None) == render_builtin(GLM41V, MESSAGES,
                                                                                    enable_thinking=None)


@pytest.mark.parametrize("template", ["{{ '{0.__class__}'.format(messages) }}", "{{ raise_exception.__globals__ }}",
                                      "{{ lipsum.__globals__ }}"])
def test_internals_render_as_nothing(template):
    # The sandbox turns forbidden attributes into an undefined value: it prints as "" and fails when used.
    assert render_template(template, MESSAGES, enable_thinking=None) == ""


def test_hostile_templates_counted(capsys):
    with capsys.disabled():
        print(f"\n{len(HOSTILE)} hostile chat templates: each raises ConfigError")
    assert len(HOSTILE) >= 20


def test_large_conversation_is_not_mistaken_for_a_bomb():
    long_text = "word " * 2_000_000  # 10 M characters: above MAX_CHARS, allowed because the user sent it
    out = render_template(REAL, [{"role": "user", "content": long_text}], enable_thinking=None)
    assert long_text in out


def test_sandbox_restores_a_previous_trace_function():
    import sys

    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        render_template(REAL, MESSAGES, enable_thinking=None)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)
