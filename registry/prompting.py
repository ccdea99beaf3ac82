"""Prompt templates: sandboxed Jinja2 with declared variables.

Templates come from users, so they are parsed and rendered in Jinja2's immutable sandbox (no attribute games,
no mutation of inputs) with StrictUndefined, and every variable a template reads must be declared up front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)


class PromptTemplateError(ValueError):
    """A template that cannot be stored or rendered; the message names the problem."""


def template_variables(source: str) -> set[str]:
    """The names a template reads, or PromptTemplateError if it does not parse."""
    try:
        ast = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise PromptTemplateError(f"template syntax error at line {exc.lineno}: {exc.message}") from None
    return set(meta.find_undeclared_variables(ast))


def check_template(source: str, declared: Iterable[str], *, field: str = "template") -> None:
    """Reject a template that reads a variable it does not declare."""
    undeclared = template_variables(source) - set(declared)
    if undeclared:
        raise PromptTemplateError(
            f"{field} uses undeclared variable(s): {', '.join(sorted(undeclared))}; "
            "declare them in the version's variables"
        )


def render(source: str, variables: Mapping[str, Any], *, field: str = "template") -> str:
    """Render one template in the sandbox; any failure becomes a PromptTemplateError naming the cause."""
    try:
        return _ENV.from_string(source).render(**variables)
    except SecurityError as exc:
        raise PromptTemplateError(f"{field} tried an unsafe operation and was stopped: {exc}") from None
    except UndefinedError as exc:
        raise PromptTemplateError(f"{field} could not be rendered: {exc.message}") from None
    except TemplateSyntaxError as exc:
        raise PromptTemplateError(f"{field} syntax error at line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # a template can raise anything a filter raises (e.g. ZeroDivisionError)
        raise PromptTemplateError(f"{field} failed while rendering: {type(exc).__name__}: {exc}") from None


def build_messages(
    *,
    template: str,
    system_message: str,
    examples: list[dict[str, Any]],
    declared: Iterable[str],
    inputs: Mapping[str, Any],
) -> list[dict[str, str]]:
    """Chat messages for one input: optional system message, few-shot turns, then the user's turn.

    Each few-shot example is {"inputs": {...}, "output": "..."}; its inputs go through the same template, so an
    example looks exactly like a real question.
    """
    declared = list(declared)
    missing = [name for name in declared if name not in inputs]
    if missing:
        raise PromptTemplateError(f"input is missing declared variable(s): {', '.join(missing)}")
    messages: list[dict[str, str]] = []
    if system_message:
        messages.append({"role": "system", "content": render(system_message, inputs, field="system message")})
    for number, example in enumerate(examples, start=1):
        ex_inputs = example.get("inputs", {})
        messages.append({"role": "user", "content": render(template, ex_inputs, field=f"example {number}")})
        messages.append({"role": "assistant", "content": str(example.get("output", ""))})
    messages.append({"role": "user", "content": render(template, inputs)})
    return messages
