"""``fixed``: one drafter and one draft length for every request (the engines' default).

    decision(c) = (drafter, k)   for every context c

It falls back to k = 0 when the drafter is not eligible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.policy.base import MAX_DRAFT_LENGTH, Context
from router.policy.tally import TablePolicy


class FixedConfig(BaseModel):
    """JSON configuration of ``fixed``: ``{"drafter": "generic", "k": 4}``."""

    model_config = ConfigDict(extra="forbid")

    drafter: str = "generic"
    k: int = Field(4, ge=0, le=MAX_DRAFT_LENGTH)


class FixedPolicy(TablePolicy):
    """Always the same (drafter, k)."""

    name = "fixed"

    def __init__(self, drafters: Sequence[str] = (), *, drafter: str = "generic", k: int = 4):
        super().__init__(drafters)
        self.drafter = drafter
        self.k = k

    @classmethod
    def from_config(
        cls, drafters: Sequence[str], config: Mapping[str, Any] | None = None
    ) -> FixedPolicy:
        cfg = FixedConfig.model_validate(dict(config or {}))
        return cls(drafters, drafter=cfg.drafter, k=cfg.k)

    def arm(self, context: Context) -> tuple[str, int]:
        return self.drafter, self.k

    def named_drafters(self) -> set[str]:
        return {self.drafter} if self.k else set()
