"""The `command` engine adapter: any OpenAI-compatible server from a user's argv template.

The template is a list of arguments; placeholders are substituted *inside each item*, so a
value with spaces (a weights path) stays one argument and nothing is ever split on spaces:

    ["llama-server", "-m", "{weights}", "--port", "{port}", "--alias", "{model}"]

Placeholders: ``{port}`` ``{host}`` ``{model}`` ``{weights}`` ``{gpus}`` (comma-separated
indices, empty without GPUs) ``{tp}`` (number of GPUs, at least 1). ``{{`` and ``}}`` are
literal braces. Anything else in braces (unknown names, ``{0}``, ``{port!r}``, ``{port:5}``,
``{x.y}``) is an EngineConfigError — templates are data, never code.

Where a template must be one string (a config file line, an environment variable), convert it
once at config time with ``parse_command_template`` (``shlex.split``: shell quoting rules, no
shell is run); placeholders are still substituted per resulting item.
"""

from __future__ import annotations

import shlex
import string

from agent.engines.base import EngineConfigError, EngineLaunch, EngineSpec, cuda_env
from agent.engines.vllm import option_args, tensor_parallel_size

PLACEHOLDERS = ("port", "host", "model", "weights", "gpus", "tp")
COMMAND_OPTIONS = {"max_concurrency": ""}  # only sets EngineLaunch.max_concurrency; adds no flag
_FORMATTER = string.Formatter()


def parse_command_template(text: str) -> tuple[str, ...]:
    """A one-string template split once with shell quoting rules (for config files and env vars)."""
    try:
        items = tuple(shlex.split(text))
    except ValueError as exc:  # unbalanced quotes
        raise EngineConfigError(f"command template {text!r}: {exc}") from None
    if not items:
        raise EngineConfigError("command template is empty")
    validate_template(items)
    return items


def validate_template(template: tuple[str, ...] | list[str]) -> None:
    """Raise EngineConfigError when any item has a placeholder we do not substitute."""
    for item in template:
        _substitute(item, dict.fromkeys(PLACEHOLDERS, ""))


def _substitute(item: str, values: dict[str, str]) -> str:
    out: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(item))
    except ValueError as exc:  # a single "{" or "}"
        raise EngineConfigError(
            f"command template item {item!r}: {exc} (write {{{{ or }}}} for a literal brace)") from None
    for literal, field, spec, conversion in parsed:
        out.append(literal)
        if field is None:
            continue
        if field not in values or spec or conversion:
            raise EngineConfigError(
                f"command template item {item!r}: unknown placeholder {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}}; use {', '.join('{' + p + '}' for p in PLACEHOLDERS)} "
                "(write {{ or }} for a literal brace)")
        out.append(values[field])
    return "".join(out)


def render_template(template: tuple[str, ...] | list[str], spec: EngineSpec) -> list[str]:
    """Substitute the placeholders in each item of ``template`` for ``spec``."""
    values = {
        "port": str(spec.port), "host": spec.host, "model": spec.model, "weights": spec.weights,
        "gpus": ",".join(str(i) for i in spec.gpu_indices), "tp": str(tensor_parallel_size(spec)),
    }
    return [_substitute(item, values) for item in template]


class CommandAdapter:
    """Builds the user's command from ``spec.template`` plus ``spec.extra_args``."""

    name = "command"

    def build(self, spec: EngineSpec) -> EngineLaunch:
        if not spec.template:
            raise EngineConfigError(
                "the command engine needs a template, e.g. "
                '["llama-server", "-m", "{weights}", "--port", "{port}", "--alias", "{model}"]')
        _, max_concurrency = option_args(self.name, spec, COMMAND_OPTIONS)
        argv = [*render_template(spec.template, spec), *spec.extra_args]
        if not argv[0]:
            raise EngineConfigError(f"command template {list(spec.template)!r} renders an empty program name")
        return EngineLaunch(argv=tuple(argv), env=cuda_env(spec), max_concurrency=max_concurrency)
