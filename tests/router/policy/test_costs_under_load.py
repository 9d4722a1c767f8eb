"""Thompson's choice between two drafters holds when the machine is busy (property tests).

Two drafters with the same acceptance differ only in cost: ``cheap`` drafts at 0.1 of a
target step, ``dear`` at 0.2, both with a fixed time per request (prefill) of 5 steps and
20-token outputs; at acceptance 0.7, S_req is ~1.36 for ``cheap`` against ~1.16 for
``dear``. Each is measured on 40 requests, in alternate spells of 10, and the policy's
choice (the rule at the posterior mean, ``describe``) is compared with the choice on exact
times when:

- every measured time is multiplied by the same factor (the whole machine slower or
  faster): the same (drafter, k) and the same expected speed-up;
- each request's draft, verify and fixed times are multiplied by independent factors in
  [1, 1 + j] (j up to 0.5), a share of requests (up to 15%) stalls x10 in one of them,
  and ``cheap`` is measured only while other work slows its requests by a factor
  ``busy`` (up to 4x) while ``dear`` runs on an idle machine: the same drafter.

The second fails on a cost model of absolute times averaged across requests (``cheap``
measured under load looks dearer than ``dear`` measured idle).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from router.policy.base import Context, Decision, Outcome
from router.policy.thompson import ThompsonPolicy

CONTEXT = Context("code")
T_STEP = 0.01  # the target's plain step, seconds
ACCEPTANCE = 0.7
REQUESTS_PER_ARM = 40
SPELL = 10  # requests per spell of one load
TOKENS = 20
FIXED_STEPS = 5.0
COSTS = {"cheap": 0.1, "dear": 0.2}
SLOPE = 0.05
#: The stated noise: multiplicative jitter up to JITTER_MAX, stalls on up to STALL_SHARE_MAX.
JITTER_MAX = 0.5
STALL_SHARE_MAX = 0.15
STALL_FACTOR = 10.0


def _accepted(k: int, rng: random.Random) -> list[int]:
    """Accepted drafts per step until TOKENS tokens, truncated-geometric at ACCEPTANCE."""
    accepted: list[int] = []
    while sum(accepted) + len(accepted) < TOKENS:
        n = 0
        while n < k and rng.random() < ACCEPTANCE:
            n += 1
        accepted.append(n)
    return accepted


def _outcome(
    drafter: str, k: int, accepted: list[int], factors: tuple[float, float, float]
) -> Outcome:
    """One request with exact costs, its draft, verify and fixed time multiplied by
    ``factors``."""
    steps = len(accepted)
    draft = steps * k * COSTS[drafter] * T_STEP * factors[0]
    verify = steps * (1.0 + SLOPE * k) * T_STEP * factors[1]
    fixed = FIXED_STEPS * T_STEP * factors[2]
    return Outcome.from_steps(
        [k] * steps,
        accepted,
        draft_time_s=draft,
        verify_time_s=verify,
        wall_time_s=draft + verify + fixed,
    )


def _train(
    noise: random.Random | None, scale: float, jitter: float, stall_share: float, busy: float
) -> ThompsonPolicy:
    """Measure both drafters in alternate spells of SPELL requests (``cheap`` in busy
    spells, ``dear`` in idle ones; k cycling 2..6 and the same accepts for both, so their
    posteriors are equal) and return the policy."""
    policy = ThompsonPolicy(["cheap", "dear"])
    accepts = random.Random(7)
    for block in range(2 * REQUESTS_PER_ARM // SPELL):
        drafter = "cheap" if block % 2 == 0 else "dear"
        load = busy if drafter == "cheap" else 1.0
        for i in range(SPELL):
            k = 2 + i % 5
            accepted = _accepted(k, accepts)
            factors = [scale * load] * 3
            if noise is not None:
                factors = [f * noise.uniform(1.0, 1.0 + jitter) for f in factors]
                if noise.random() < stall_share:
                    factors[noise.randrange(3)] *= STALL_FACTOR
            outcome = _outcome(drafter, k, accepted, (factors[0], factors[1], factors[2]))
            policy.update(CONTEXT, Decision(drafter, k), outcome)
    return policy


def _choice(policy: ThompsonPolicy) -> tuple[str, int, float]:
    summary = policy.describe()[0]
    arm = next(a for a in summary.arms if a.drafter == summary.chosen_drafter)
    return summary.chosen_drafter, summary.chosen_k, arm.expected_speedup


EXACT = _choice(_train(None, 1.0, 0.0, 0.0, 1.0))


def test_on_exact_times_the_cheaper_drafter_wins() -> None:
    drafter, k, speedup = EXACT
    assert drafter == "cheap" and k >= 2
    assert 1.2 < speedup < 1.6


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e3))
def test_the_same_factor_on_every_time_changes_nothing(scale: float) -> None:
    drafter, k, speedup = _choice(_train(None, scale, 0.0, 0.0, 1.0))
    assert (drafter, k) == EXACT[:2]
    assert abs(speedup - EXACT[2]) <= 1e-9 * EXACT[2]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    jitter=st.floats(min_value=0.0, max_value=JITTER_MAX),
    stall_share=st.floats(min_value=0.0, max_value=STALL_SHARE_MAX),
    busy=st.floats(min_value=1.0, max_value=4.0),
)
def test_jitter_stalls_and_a_busy_spell_on_one_arm_do_not_flip_the_choice(
    seed: int, jitter: float, stall_share: float, busy: float
) -> None:
    policy = _train(random.Random(seed), 1.0, jitter, stall_share, busy)
    assert _choice(policy)[0] == "cheap"
