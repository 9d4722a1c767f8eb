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
- ``copy_ngram``: the stationary world with the n-gram drafter drafting copies, as prompt
  lookup does: 70% of lookups find a match, which is a repeated stretch (geometric
  length, mean 20 tokens) with the n-gram's acceptance as probability and rejected at
  once otherwise; the other 30% draft nothing. Long n-gram drafts pay where stretches
  are common; ``thompson_geo`` (the n-gram drafter priced by one per-token acceptance,
  k <= 8, thompson before the copy model) and ``thompson_g16`` (the same with k_max
  16) run beside thompson. Only here is ``ngram`` one of thompson's copy drafters
  (``copy_drafters: ["ngram"]``, as the sidecar configures its n-gram drafters; the
  policy alone has none): in the other scenarios its truth is a per-token geometric
  law, and thompson keeps the policy's default (no copy drafters).
"""

from __future__ import annotations

from benchmarks.policy_sim.ground_truth import NGRAM, GroundTruth, random_ground_truth
from benchmarks.policy_sim.simulate import Event, LoadModel, PolicySpec, Scenario

DRIFT_CLUSTER = "code"
NEW_DRAFTER = "translation"
COPY_MATCH = 0.7


def policy_specs(truth: GroundTruth, drafters: tuple[str, ...], seed: int) -> list[PolicySpec]:
    """The policies compared: baselines, the references (ucb, oracle) and thompson."""
    generic = "generic" if "generic" in drafters else drafters[0]
    static = {c: (c if c in drafters else generic, 4) for c in truth.clusters}
    # Where the truth's n-gram drafter is geometric (not a copy drafter), thompson is told
    # so, as a deployment would be: its copy model assumes runs that go on across steps.
    thompson: dict[str, object] = {"seed": seed}
    if truth.copy_match is not None:
        thompson["copy_drafters"] = [NGRAM]
    specs = [
        PolicySpec("none", "none"),
        PolicySpec("fixed", "fixed", {"drafter": generic, "k": 4}),
        PolicySpec("static", "static", {"table": static}),
        PolicySpec("ucb", "ucb", {"seed": seed}),
        PolicySpec("thompson", "thompson", thompson),
        PolicySpec("thompson_fi", "thompson", thompson, full_information=True),
    ]
    if truth.copy_match is not None:
        geometric = {"seed": seed, "copy_drafters": []}
        specs += [
            PolicySpec("thompson_geo", "thompson", geometric),
            PolicySpec("thompson_g16", "thompson", {**geometric, "k_max": 16}),
        ]
    return [*specs, PolicySpec("oracle", "oracle")]


#: Every scenario's name, in ``build_scenarios``' order (the two new_drafter ones only
#: where the world has the new drafter).
SCENARIO_NAMES = (
    "stationary",
    "drift",
    "new_drafter_prior",
    "new_drafter_no_prior",
    "many_drafters",
    "bursty_load",
    "copy_ngram",
)


def build_scenarios(truth: GroundTruth, requests: int, seed: int) -> list[Scenario]:
    """The seven scenarios over ``truth`` (see the module docstring)."""
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
    scenarios.append(
        Scenario(
            "copy_ngram",
            f"n-gram drafts copies: {COPY_MATCH:.0%} of lookups match, a repeated stretch "
            "or rejected at once",
            truth.with_copy_ngram(COPY_MATCH),
            everyone,
            (),
            requests,
        )
    )
    return scenarios


__all__ = [
    "DRIFT_CLUSTER",
    "NEW_DRAFTER",
    "NGRAM",
    "SCENARIO_NAMES",
    "build_scenarios",
    "policy_specs",
]
