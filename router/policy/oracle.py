"""``oracle``: told the true best (drafter, k) per context; the reference for regret.

    decision(c) = argmax_{d, k} S_true(c, d, k)   (given as a table, see ``static``)

Only benchmarks can build it: they know the true acceptances and costs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from router.policy.static import StaticConfig, StaticPolicy


class OraclePolicy(StaticPolicy):
    """A static table that holds the true best arm of every context."""

    name = "oracle"

    @classmethod
    def from_config(
        cls, drafters: Sequence[str], config: Mapping[str, Any] | None = None
    ) -> OraclePolicy:
        cfg = StaticConfig.model_validate(dict(config or {}))
        if not cfg.table:
            raise ValueError("the oracle policy needs {'table': {context: [drafter, k]}}")
        return cls(drafters, table=cfg.table, default=cfg.default)
