"""PromQL helpers for tests: which metric names an expression reads, and what a registry exports."""

from __future__ import annotations

import re
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

_TYPE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "unknown": ("",),
}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
_GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's interval variables with literal durations so promtool can parse."""
    for variable, value in _GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, grouping and functions ignored)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)             # string literals
    text = re.sub(r"\{[^}]*\}", "", text)                         # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                        # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group(0).lower() in _KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def exported_names(registries: Iterable[CollectorRegistry]) -> set[str]:
    """Every series name the registries can expose, with type suffixes (_total, _bucket...)."""
    names = set()
    for registry in registries:
        for family in registry.collect():
            for suffix in _TYPE_SUFFIXES[family.type]:
                names.add(family.name + suffix)
    return names


def family_names(registries: Iterable[CollectorRegistry]) -> set[str]:
    """Family names as documented: counters with ``_total``, others by their base name."""
    return {f.name + ("_total" if f.type == "counter" else "")
            for registry in registries for f in registry.collect()}


def scraped_names(text: str) -> set[str]:
    """Every series name a /metrics page can expose (families it declares, with type suffixes),
    including labelled families that have no samples yet."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name + suffix
            for family in text_string_to_metric_families(text)
            for suffix in _TYPE_SUFFIXES[family.type]}


def scraped_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``{(sample name, labels): value}`` of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
