"""Model loading, drafter kinds and the speculative decoding engine.

Names are imported lazily (PEP 562) so that importing one submodule stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SamplingConfig": "drafters.sampling",
    "GenerationStats": "drafters.stats",
    "Drafter": "drafters.base",
    "DraftSession": "drafters.base",
    "Proposal": "drafters.base",
    "DRAFTER_KINDS": "drafters.registry",
    "create_drafter": "drafters.registry",
    "check_options": "drafters.registry",
    "draft_cost_hint": "drafters.registry",
    "copies_context": "drafters.registry",
    "cost_shape": "drafters.registry",
    "PATH_KINDS": "drafters.registry",
    "TokenizerMismatchError": "drafters.registry",
    "TargetWeightsRequiredError": "drafters.registry",
    "SpeculativeEngine": "drafters.engine",
    "GenerationRun": "drafters.engine",
    "TokenEvent": "drafters.engine",
    "TokenLogprob": "drafters.engine",
    "DraftLengthSchedule": "drafters.engine",
    "Verification": "drafters.verify",
    "verify": "drafters.verify",
    "score_counterfactual": "drafters.counterfactual",
    "score_counterfactual_drafts": "drafters.counterfactual",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'drafters' has no attribute {name!r}")
    return getattr(import_module(module), name)
