"""Metric names in a PromQL expression (enough of PromQL for dashboards: no full parser)."""

from __future__ import annotations

import re

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Every metric an expression selects: ``sum by (m) (rate(x_total{a="b"}[5m]))`` -> {"x_total"}.

    ``label_values(metric, label)`` (a Grafana variable query) gives its metric only.
    """
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)[^)]*\)", r"\1", expr)
    expr = _STRINGS.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)         # range and subquery durations ($__rate_interval too)
    expr = _GROUPING.sub("", expr)
    names = set()
    for match in _IDENT.finditer(expr):
        name, call = match.group(1), match.group(2)
        if call or name in _KEYWORDS:
            continue                                # a function or aggregation, or a keyword
        names.add(name)
    return names


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics text offers, with the suffixes of its families' types."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            names |= {f"{name}{s}" for s in {"counter": ("_total", "_created"),
                                              "histogram": ("_bucket", "_sum", "_count", "_created"),
                                              "summary": ("_sum", "_count", "_created")}.get(kind.strip(), ())}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names
