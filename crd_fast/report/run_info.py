"""How an evaluation run was set up, as the report shows it (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunInfo:
    """How the run was made: every setting (shown and stored as given) and the backbone weights.

    ``random_weights`` marks a backbone with random (untrained) weights; the report then carries a banner
    saying the scores say nothing about real accuracy. It is also set when ``weights`` starts with "random".
    """

    settings: dict[str, Any] = field(default_factory=dict)
    weights: str = "unknown"
    random_weights: bool = False
    title: str = "crd-fast evaluation report"
    command: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if str(self.weights).strip().lower().startswith("random"):
            self.random_weights = True
