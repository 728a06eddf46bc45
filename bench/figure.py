"""One benchmark figure: the measured value, its reference, the target and the verdict."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .common import Stat


@dataclass
class Bar:
    """One bar of the chart: a median with its min–max spread."""

    label: str
    stat: Stat
    reference: bool = False


@dataclass
class Panel:
    title: str
    bars: list[Bar]
    unit: str = "s"
    target_line: float | None = None


@dataclass
class Figure:
    id: str
    title: str
    value: str = "n/a"
    reference: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = "n/a"  # met | missed | info | failed
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    bars: list[Bar] = field(default_factory=list)
    unit: str = "s"
    seconds: float = 0.0  # wall time spent on this figure (on its phase, when shared)
    phase: str = ""  # figures measured together (P5+P6 share their boots) name one phase
    target_line: float | None = None  # drawn on the chart when set
    extra_panels: list[Panel] = field(default_factory=list)  # more chart panels, other scales

    def panels(self) -> list[Panel]:
        main = [Panel(f"{self.id}: {self.title}", self.bars, self.unit, self.target_line)]
        return [p for p in main + self.extra_panels if p.bars]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "title": self.title, "value": self.value, "reference": self.reference,
            "ratio": self.ratio, "target": self.target, "verdict": self.verdict,
            "notes": self.notes, "data": self.data, "unit": self.unit,
            "bars": [{"label": b.label, "reference": b.reference, **b.stat.as_dict()}
                     for b in self.bars],
            "seconds": round(self.seconds, 1), "phase": self.phase or self.id,
        }


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"
