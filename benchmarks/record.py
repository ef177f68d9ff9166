"""The one record format every benchmark reports in."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Record:
    """One measurement, compared with a baseline and a target.

    ``value`` is usually a ratio (e.g. speed-up of qlab over the plain implementation)
    so results read the same on any machine; ``baseline`` names what it is compared
    with and ``target`` states the goal in words (e.g. ">= 4").
    """

    name: str
    metric: str
    value: float
    unit: str
    target: str = ""
    baseline: str = ""
    met: bool | None = None
    notes: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def markdown_table(records: list[Record]) -> str:
    columns = ["benchmark", "metric", "value", "unit", "target", "met", "baseline", "notes"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        cells = [r.name, r.metric, f"{r.value:.4g}", r.unit, r.target, met, r.baseline, r.notes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
