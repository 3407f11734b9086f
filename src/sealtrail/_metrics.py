"""The Prometheus text exposition format, for the metrics files that ``sealtrail deliver``
and ``sealtrail relay`` keep (node_exporter's textfile collector reads them). Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: One metric: (name after the prefix, "gauge" or "counter", value, help text).
Metric = tuple[str, str, float | int | None, str]


def exposition(prefix: str, labels: Mapping[str, str], metrics: Iterable[Metric]) -> str:
    """The metrics as text: ``# HELP``, ``# TYPE`` and one sample each, all with
    ``labels``; a value of None (not known now) is written as NaN."""
    label = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    lines = []
    for name, kind, value, text in metrics:
        metric = f"{prefix}_{name}"
        lines += [f"# HELP {metric} {text}", f"# TYPE {metric} {kind}"]
        shown = (
            "NaN" if value is None or (isinstance(value, float) and math.isnan(value)) else value
        )
        lines.append(f"{metric}{{{label}}} {shown}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
