"""``none``: never speculate (k = 0), the plain-decoding baseline.

decision(c) = ("none", 0),   S = 1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.policy.base import NONE_DRAFTER, Context
from router.policy.tally import TablePolicy


class NonePolicy(TablePolicy):
    """Plain decoding for every request."""

    name = "none"

    @classmethod
    def from_config(
        cls, drafters: Sequence[str], config: Mapping[str, Any] | None = None
    ) -> NonePolicy:
        if config:
            raise ValueError("the none policy takes no configuration")
        return cls(drafters)

    def arm(self, context: Context) -> tuple[str, int]:
        return NONE_DRAFTER, 0
