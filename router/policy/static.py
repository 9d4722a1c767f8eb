"""``static``: a hand-made table from task cluster to (drafter, k), as an operator would set.

    decision(c) = table["<cluster>/<bucket>"]  or  table[cluster]  or  default

Missing entries, and table drafters that are not eligible, mean k = 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.policy.base import NONE_DRAFTER, Context
from router.policy.config_types import DraftLength
from router.policy.tally import TablePolicy

#: A table entry: (drafter, k), k a draft length the policies model (0 = no speculation).
Arm = tuple[str, DraftLength]


class StaticConfig(BaseModel):
    """JSON configuration: ``{"table": {"code": ["code", 4], ...}, "default": ["generic", 4]}``."""

    model_config = ConfigDict(extra="forbid")

    table: dict[str, Arm] = Field(default_factory=dict)
    default: Arm | None = None


def table_key(context: Context) -> str:
    """The per-context key of a table: ``"<cluster>/<length bucket>"``, and
    ``"<cluster>/<length bucket>/structured"`` for structured output."""
    key = f"{context.cluster}/{context.length_bucket}"
    return f"{key}/structured" if context.structured else key


class StaticPolicy(TablePolicy):
    """Looks the arm up in a table keyed by context, then by cluster."""

    name = "static"

    def __init__(
        self,
        drafters: Sequence[str] = (),
        *,
        table: Mapping[str, tuple[str, int]] | None = None,
        default: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(drafters)
        self.table = {key: (str(d), int(k)) for key, (d, k) in (table or {}).items()}
        self.default = default

    @classmethod
    def from_config(
        cls, drafters: Sequence[str], config: Mapping[str, Any] | None = None
    ) -> StaticPolicy:
        cfg = StaticConfig.model_validate(dict(config or {}))
        return cls(drafters, table=cfg.table, default=cfg.default)

    def named_drafters(self) -> set[str]:
        entries = [*self.table.values(), *([self.default] if self.default else [])]
        return {drafter for drafter, k in entries if k}

    def arm(self, context: Context) -> tuple[str, int]:
        """The table's arm for the context, else for its free-text context (a structured
        one's), else for its cluster, else the default."""
        free = f"{context.cluster}/{context.length_bucket}"
        entry = (
            self.table.get(table_key(context))
            or self.table.get(free)
            or self.table.get(context.cluster)
        )
        return entry or self.default or (NONE_DRAFTER, 0)
