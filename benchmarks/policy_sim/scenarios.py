"""The simulator's scenarios and the policies compared in each.

- ``stationary``: the built-in world's drafters (generic, one per task, n-gram), fixed mix.
- ``drift``: at 40% of the stream, the ``code`` drafter's acceptance on ``code`` drops by
  0.35 (its domain moved); the best arm for that cluster changes.
- ``new_drafter_prior`` / ``new_drafter_no_prior``: the ``translation`` drafter is missing
  at the start and registered at 40% of the stream, with and without the similarity of
  its fine-tuning sample to each cluster.
- ``many_drafters``: 8 drafters with random acceptance and costs on the same clusters
  (16 contexts): the case the select() latency target is stated for.
- ``bursty_load``: the stationary world on a busy machine (``LoadModel``): busy spells
  slow whole requests 1.5-3x, 3% of requests stall x10 in their draft or verify phase.
"""

from __future__ import annotations

from benchmarks.policy_sim.ground_truth import NGRAM, GroundTruth, random_ground_truth
from benchmarks.policy_sim.simulate import Event, LoadModel, PolicySpec, Scenario

DRIFT_CLUSTER = "code"
NEW_DRAFTER = "translation"


def policy_specs(truth: GroundTruth, drafters: tuple[str, ...], seed: int) -> list[PolicySpec]:
    """The policies compared: baselines, the references (ucb, oracle) and thompson."""
    generic = "generic" if "generic" in drafters else drafters[0]
    static = {c: (c if c in drafters else generic, 4) for c in truth.clusters}
    return [
        PolicySpec("none", "none"),
        PolicySpec("fixed", "fixed", {"drafter": generic, "k": 4}),
        PolicySpec("static", "static", {"table": static}),
        PolicySpec("ucb", "ucb", {"seed": seed}),
        PolicySpec("thompson", "thompson", {"seed": seed}),
        PolicySpec("thompson_fi", "thompson", {"seed": seed}, full_information=True),
        PolicySpec("oracle", "oracle"),
    ]


def build_scenarios(truth: GroundTruth, requests: int, seed: int) -> list[Scenario]:
    """The six scenarios over ``truth`` (see the module docstring)."""
    everyone = truth.drafters
    at = int(requests * 0.4)
    without_new = tuple(d for d in everyone if d != NEW_DRAFTER)
    many = random_ground_truth(8, truth.clusters, seed)
    scenarios = [
        Scenario("stationary", "all drafters, fixed acceptance", truth, everyone, (), requests),
        Scenario(
            "drift",
            f"{DRIFT_CLUSTER} drafter loses 0.35 acceptance on {DRIFT_CLUSTER} at {at}",
            truth,
            everyone,
            (Event(at, "drift", DRIFT_CLUSTER, DRIFT_CLUSTER, -0.35),),
            requests,
        ),
    ]
    if NEW_DRAFTER in everyone:
        for with_prior in (True, False):
            scenarios.append(
                Scenario(
                    "new_drafter_prior" if with_prior else "new_drafter_no_prior",
                    f"{NEW_DRAFTER} drafter registered at {at}"
                    + (" with its similarity prior" if with_prior else " with a neutral prior"),
                    truth,
                    without_new,
                    (Event(at, "add", NEW_DRAFTER, NEW_DRAFTER, with_similarity=with_prior),),
                    requests,
                )
            )
    scenarios.append(
        Scenario(
            "many_drafters", "8 random drafters x 16 contexts", many, many.drafters, (), requests
        )
    )
    scenarios.append(
        Scenario(
            "bursty_load",
            "all drafters; busy spells slow requests 1.5-3x, 3% stall x10 in one phase",
            truth,
            everyone,
            (),
            requests,
            LoadModel(),
        )
    )
    return scenarios


__all__ = ["DRIFT_CLUSTER", "NEW_DRAFTER", "NGRAM", "build_scenarios", "policy_specs"]
