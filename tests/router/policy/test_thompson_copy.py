"""Thompson's copy-drafter model (router/policy/copying.py): censored run counts,
long drafts where copies are kept whole and not where they are rejected, model drafters'
decisions as before, state round trip and old states, and pooling through Outcomes."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from router.metrics import create_metrics
from router.policy.base import STATE_VERSION, Context, Decision, DrafterHints, Outcome
from router.policy.copying import (
    CopyRuns,
    counterfactual_counts,
    kept_prior,
    run_counts,
    runs_of_steps,
)
from router.policy.costs import StepRatios
from router.policy.registry import make_policy
from router.policy.thompson import ThompsonPolicy, speedup_tables
from router.policy_holder import PolicyHolder
from router.pooling.entries import EntrySigner
from router.pooling.link import RedisLink
from router.pooling.outcomes import OutcomePool
from router.pooling.streams import StreamReader, StreamWriter
from router.settings import PoolingSettings
from router.store import SidecarStore

from .helpers import T_AR, geometric_outcome

CHAT = Context("chat", 0)
DRAFTERS = ["generic", "ngram"]
# The copy model is opt-in (thompson's default has no copy drafters).
COPY = ("ngram",)


def copy_outcome(
    rng: np.random.Generator,
    decision: Decision,
    *,
    match: float,
    keep: float,
    rejected_acceptance: float = 0.0,
    run_mean: float = 30.0,
    tokens: int = 100,
    draft_cost: float = 0.01,
    verify_slope: float = 0.05,
) -> Outcome:
    """A prompt-lookup request, run by run: a lookup matches with probability ``match``;
    a match is a stretch the target repeats (R geometric, mean ``run_mean``) with
    probability ``keep``, else a copy accepted geometrically with ``rejected_acceptance``
    (0: rejected at once). At draft length k a run of R takes floor(R / (k + 1)) + 1
    steps (full steps while more than k are left); an unmatched lookup drafts nothing."""
    k = decision.k
    drafted: list[int] = []
    accepted: list[int] = []
    while sum(accepted) + len(accepted) < tokens:
        if rng.random() >= match:
            drafted.append(0)
            accepted.append(0)
            continue
        if rng.random() < keep:
            left = int(rng.geometric(1.0 / run_mean))
        else:
            left = int(rng.geometric(1.0 - rejected_acceptance)) - 1
        while left > k:
            drafted.append(k)
            accepted.append(k)
            left -= k + 1
        drafted.append(k)
        accepted.append(left)
    steps, total = len(drafted), sum(drafted)
    return Outcome.from_steps(
        drafted,
        accepted,
        draft_time_s=total * draft_cost * T_AR,
        verify_time_s=(steps + verify_slope * total) * T_AR,
    )


def _train(
    policy: ThompsonPolicy,
    requests: int,
    seed: int = 0,
    *,
    match: float,
    keep: float,
    rejected_acceptance: float = 0.0,
    run_mean: float = 30.0,
) -> list[Decision]:
    """``generic`` at a per-token acceptance of 0.5, ``ngram`` as ``copy_outcome``."""
    rng = np.random.default_rng(seed)
    decisions = []
    for _ in range(requests):
        decision = policy.select(CHAT, DRAFTERS)
        if decision.drafter == "ngram":
            outcome = copy_outcome(
                rng,
                decision,
                match=match,
                keep=keep,
                rejected_acceptance=rejected_acceptance,
                run_mean=run_mean,
            )
        else:
            outcome = geometric_outcome(rng, decision, 0.5)
        policy.update(CHAT, decision, outcome)
        decisions.append(decision)
    return decisions


def test_runs_are_read_across_steps_and_censored_where_unrefuted() -> None:
    """k = 4; steps (drafted, accepted): (4, 4) full, the run goes on (+5); (4, 2) ends
    it at R = 7; (0, 0) an unmatched start; (4, 0) a match rejected at once, R = 0;
    (2, 2) a draft cut short and all kept, censored at 2; (4, 4) full at the end of the
    request, censored at 5."""
    drafted, accepted = [4, 4, 0, 4, 2, 4], [4, 2, 0, 0, 2, 4]
    assert runs_of_steps(drafted, accepted, 4) == [
        (True, 7, False),
        (False, 0, False),
        (True, 0, False),
        (True, 2, True),
        (True, 5, True),
    ]
    counts = run_counts(drafted, accepted, 4, 10)
    assert (counts[0, 0], counts[1, 0]) == (4, 1) and not counts[:2, 1:].any()  # c
    np.testing.assert_array_equal(counts[2], [3, 3, 2, 2, 2, 1, 1, 0, 0, 0])  # h: went on
    np.testing.assert_array_equal(counts[3], [1, 0, 0, 0, 0, 0, 0, 1, 0, 0])  # h: ended
    assert not run_counts(drafted, accepted, 0, 10).any()


def test_a_step_the_loss_guard_shortened_is_full_when_it_drafted_what_it_asked() -> None:
    """Decision k = 8, the guard asking 3: five steps of 3 accepted 3 were read as five
    runs cut short (five extra matched starts) and the miss as an h_1 failure; the run is
    one of 15 accepted + 5 bonus tokens refuted at h_21."""
    drafted, accepted = [3] * 6, [3] * 5 + [0]
    assert runs_of_steps(drafted, accepted, 8, [3] * 6) == [(True, 20, False)]


def test_steps_that_asked_for_no_draft_are_no_lookups() -> None:
    """The loss guard, once settled on k' = 0, asks for no draft on every later step: each
    was read as an unmatched start (4 full steps then 20 such steps gave c 1 success
    against 19 failures), and the run before them as refuted."""
    drafted, accepted = [4, 4, 4, 4] + [0] * 20, [4, 4, 4, 4] + [0] * 20
    requested = [4] * 4 + [0] * 20
    assert runs_of_steps(drafted, accepted, 4, requested) == [(True, 20, True)]
    counts = run_counts(drafted, accepted, 4, 24, requested)
    assert (counts[0, 0], counts[1, 0]) == (1, 0)  # one match, no failed lookup
    assert not counts[3].any()  # nothing refuted


def test_a_drafter_played_at_k_4_learns_that_its_runs_are_long() -> None:
    """Only k = 4 played, every matched copy kept whole: full steps carry the run on, so
    the run lengths, and the price of k = 16, are learnt without playing 16."""
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        decision = Decision("ngram", 4)
        policy.update(CHAT, decision, copy_outcome(rng, decision, match=0.6, keep=1.0))
    evidence = policy.copies_[CHAT]["ngram"].evidence
    assert evidence[2, 12] > 0  # runs of 13 tokens and more, read from k = 4 steps
    ngram = next(arm for arm in policy.describe()[0].arms if arm.drafter == "ngram")
    assert ngram.best_k > 8


def test_a_run_length_no_run_reached_goes_on_like_the_last_one_reached() -> None:
    """h_1 = 0.3 seen, nothing beyond: h_2 starts from "kept" (not from h_1), and h_3..
    borrow from it; where runs ended at 3, h_4.. are expected to end too."""
    evidence = np.zeros((4, 8))
    evidence[2, 0], evidence[3, 0] = 3.0, 7.0
    arm = CopyRuns(8, (1.0, 1.0), kept_prior(2.0), 2.0, evidence)
    _, hazard = arm.means()
    assert hazard[0] == pytest.approx(4 / 12) and np.all(hazard[1:] > 0.99)
    evidence[2, :3], evidence[3, 3] = 50.0, 50.0  # every run ended at R = 3
    _, hazard = CopyRuns(8, (1.0, 1.0), kept_prior(2.0), 2.0, evidence).means()
    assert hazard[3] < 0.05 and np.all(hazard[4:] < 0.1)


def test_counterfactual_starts_count_by_the_chance_of_a_match() -> None:
    """Scores [0, 4, 1] at k = 4: a start with nothing accepted was a match rejected at
    once with c (1 - h_1) / (1 - c h_1) = 1/3 at c = h_1 = 0.5; then a run of 4 + 1 + 1
    = 6; c learns nothing from a score."""
    counts = counterfactual_counts([0, 4, 1], 4, 8, 0.5, 0.5)
    assert not counts[:2].any()
    np.testing.assert_allclose(counts[2], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(counts[3], [1 / 3, 0, 0, 0, 0, 0, 1, 0])
    # A drafter known to match every start: every empty start is a rejection.
    np.testing.assert_allclose(counterfactual_counts([0], 4, 8, 1.0, 0.5)[3, 0], 1.0)


def test_a_score_does_not_pull_the_match_rate_away_from_own_outcomes() -> None:
    """Own outcomes show half the run starts drafting nothing; many counterfactual scores
    leave c there and learn h_1 as the chance of a kept first token given a match, not
    the product c h_1 the scores show."""
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        decision = Decision("ngram", 8)
        policy.update(CHAT, decision, copy_outcome(rng, decision, match=0.5, keep=0.6))
    for _ in range(200):  # scores: a step accepts 8 with 0.5 * 0.6, else 0
        accepted = np.where(rng.random(40) < 0.3, 8, 0).tolist()
        policy.update_counterfactual(CHAT, "ngram", accepted, 8)
    match, hazard = policy.copies_[CHAT]["ngram"].means()
    assert 0.4 < match[0] < 0.6
    assert 0.5 < hazard[0] < 0.7
    # Scores alone leave c at its prior "it matches" (priced with every draft made).
    other = Context("math", 0)  # no sibling context to transfer from
    for _ in range(50):
        policy.update_counterfactual(other, "ngram", [0, 0, 8, 0], 8)
    assert policy.copies_[other]["ngram"].means()[0][0] > 0.98


def test_a_score_that_counts_its_drafts_teaches_the_match_rate() -> None:
    """A lookup's score with its drafted counts (``drafters.base.DraftCounter``) is read
    as its own outcome would be: its first plays met prompts with nothing to copy (c near
    0), and the scores of requests it did not serve, which copy often, bring c back up
    where accepts alone (an empty start: no match, or a match rejected) left it."""

    def first_plays(policy: ThompsonPolicy) -> None:
        nothing = Outcome([0] * 12, [0] * 12, 0.0, 0.0, 0.0, 12)
        for _ in range(3):
            policy.update(CHAT, Decision("ngram", 8), nothing)

    counted = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    accepts_only = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    for policy in (counted, accepts_only):
        first_plays(policy)
    assert counted.copies_[CHAT]["ngram"].means()[0][0] < 0.1
    # Scores: of three lookups, two match (runs of 12 and 11 tokens), one finds nothing.
    drafted, accepted = [8, 8, 0, 8, 8] * 4, [8, 3, 0, 8, 2] * 4
    for _ in range(10):
        counted.update_counterfactual(CHAT, "ngram", accepted, 8, drafted)
        accepts_only.update_counterfactual(CHAT, "ngram", accepted, 8)
    assert counted.copies_[CHAT]["ngram"].means()[0][0] > 0.4
    assert accepts_only.copies_[CHAT]["ngram"].means()[0][0] < 0.1
    # The same counts as the drafter's own outcome of those steps.
    own = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    first_plays(own)
    for _ in range(10):
        own.update(CHAT, Decision("ngram", 8), Outcome(drafted, accepted, 0.0, 0.0, 0.0, 100))
    np.testing.assert_allclose(
        counted.copies_[CHAT]["ngram"].evidence, own.copies_[CHAT]["ngram"].evidence
    )


def test_a_scores_drafted_counts_that_do_not_pair_up_teach_nothing() -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    policy.update_counterfactual(CHAT, "ngram", [8, 0], 8, [8, 0])
    before = (policy.version, policy._posterior(CHAT)[0].copy())
    for drafted in ([8], [8, 0, 8], [3, 0]):  # unpaired, or keeping more than drafted
        with pytest.raises(ValueError):
            policy.update_counterfactual(CHAT, "ngram", [8, 0], 8, drafted)
    assert policy.version == before[0]
    np.testing.assert_array_equal(policy._posterior(CHAT)[0], before[1])


def test_a_scored_last_copy_that_reaches_the_outputs_end_is_no_failure() -> None:
    """A last step that drafted only what it kept (the copy ran to the output's end) is
    a matched start and a censored run, not a rejection, as in the engine's outcome."""
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    column = DRAFTERS.index("ngram")
    alpha0, beta0 = (p[column] for p in policy._posterior(CHAT))
    policy.update_counterfactual(CHAT, "ngram", [0, 3], 8, [0, 3])
    alpha, beta = (p[column] for p in policy._posterior(CHAT))
    assert (alpha - alpha0, beta - beta0) == pytest.approx((3, 1))  # the empty step only
    evidence = policy.copies_[CHAT]["ngram"].evidence
    np.testing.assert_allclose(evidence[:2, 0], [1, 1])  # one matched start, one not
    assert evidence[3].sum() == 0  # the run of 3 is censored: no failure


#: Nine lookups in ten find a match; a match is a repeated stretch (R geometric, mean
#: 30) in 35% of cases and rejected at once otherwise. Truth per run start (t_draft 0.01,
#: verify slope 0.05): 10.45 tokens; S(8) = 3.75, S(12) = 3.93, S(16) = 3.89.
WHOLE_OR_NOTHING = (0.9, 0.35)


def test_copies_kept_whole_make_thompson_draft_more_than_eight() -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    decisions = _train(policy, 150, match=WHOLE_OR_NOTHING[0], keep=WHOLE_OR_NOTHING[1])
    last = Counter((d.drafter, d.k) for d in decisions[-50:])
    assert sum(n for (drafter, k), n in last.items() if drafter == "ngram" and k > 8) >= 45
    summary = policy.describe()[0]
    assert summary.chosen_drafter == "ngram" and summary.chosen_k > 8
    ngram = next(arm for arm in summary.arms if arm.drafter == "ngram")
    assert 3.4 < ngram.expected_speedup < 4.4


def test_without_the_copy_model_the_n_gram_drafter_stops_at_eight() -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=(), rng=np.random.default_rng(0))
    decisions = _train(policy, 150, match=WHOLE_OR_NOTHING[0], keep=WHOLE_OR_NOTHING[1])
    assert all(d.k <= 8 for d in decisions)
    assert policy.copies_ == {}


@pytest.mark.parametrize(
    ("match", "keep", "rejected", "run_mean"),
    [(0.15, 0.1, 0.0, 3.0), (0.9, 0.0, 0.3, 3.0)],
    ids=["rare-short-runs", "copies-rejected-early"],
)
def test_rare_or_short_copies_keep_drafts_short(
    match: float, keep: float, rejected: float, run_mean: float
) -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(1))
    decisions = _train(
        policy,
        150,
        seed=1,
        match=match,
        keep=keep,
        rejected_acceptance=rejected,
        run_mean=run_mean,
    )
    assert sum(d.k > 8 for d in decisions[-100:]) <= 2
    summary = policy.describe()[0]
    assert summary.chosen_k <= 8


def _decision_digest(policy: ThompsonPolicy) -> str:
    """The decisions of a fixed training run and a batch over three contexts."""
    rng = np.random.default_rng(11)
    truth = {"generic": 0.45, "code": 0.72, "math": 0.6}
    contexts = [Context("code", 1), Context("math", 0), Context("chat", 2)]
    rows: list[Any] = []
    for i in range(300):
        context = contexts[i % 3]
        decision = policy.select(context, list(truth))
        outcome = geometric_outcome(
            rng, decision, truth.get(decision.drafter, 0.0), fixed_time=0.02
        )
        policy.update(context, decision, outcome)
        rows.append(decision)
    rows += policy.select_many(contexts * 4, list(truth))
    text = json.dumps([(d.drafter, d.k, round(d.expected_speedup, 9), d.explored) for d in rows])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_model_drafters_decide_as_before_the_copy_model() -> None:
    """The digest was computed with the code before the copy model (4ffedfe's parent):
    a policy without copy drafters makes the same decisions from the same draws (with
    the length rule of that code: k at the draw)."""
    config = {"seed": 3, "explore_length": "draw"}
    policy = make_policy("thompson", ["generic", "code", "math"], config)
    assert isinstance(policy, ThompsonPolicy)
    assert _decision_digest(policy) == "8e93687f7c0e614a"


def test_model_drafters_rows_are_priced_as_before_beside_a_copy_drafter() -> None:
    policy = ThompsonPolicy(
        ["generic", "ngram", "code"], copy_drafters=COPY, rng=np.random.default_rng(2)
    )
    rng = np.random.default_rng(2)
    for _ in range(30):
        decision = policy.select(CHAT, ["generic", "ngram", "code"])
        if decision.drafter == "ngram":
            outcome = copy_outcome(rng, decision, match=0.5, keep=0.9)
        else:
            outcome = geometric_outcome(rng, decision, 0.5)
        policy.update(CHAT, decision, outcome)
    alpha, beta, prices, copy = policy._inputs([CHAT], [0, 1, 2], [policy._posterior(CHAT)])
    assert copy is not None and copy.columns == (1,)
    acceptance = alpha / (alpha + beta)
    copy_alpha, copy_beta = copy.parameters()
    table = speedup_tables(acceptance, prices, copy, copy_alpha / (copy_alpha + copy_beta))
    geometric = prices.speedups(acceptance)
    assert table.shape[-1] == 17 and geometric.shape[-1] == 9
    np.testing.assert_array_equal(table[0, [0, 2], :9], geometric[0, [0, 2]])
    # Past their k_max (8), model drafters stand at it (argmax takes the first of equals).
    np.testing.assert_array_equal(table[0, [0, 2], 9:], np.repeat(geometric[0, [0, 2], 8:], 8, -1))


def test_state_round_trip_keeps_the_copy_statistics() -> None:
    policy = make_policy("thompson", DRAFTERS, {"seed": 4, "copy_drafters": list(COPY)})
    assert isinstance(policy, ThompsonPolicy)
    _train(policy, 60, match=0.5, keep=0.9)
    policy.update_counterfactual(Context("chat", 1), "ngram", [3, 0, 8], 8)
    saved = json.loads(json.dumps(policy.state_dict()))
    assert saved["version"] == STATE_VERSION == 2
    assert {(c, b, d) for c, b, d, _ in saved["copy"]["arms"]} == {
        ("chat", 0, "ngram"),
        ("chat", 1, "ngram"),
    }
    restored = make_policy("thompson", [], {"seed": 99, "copy_drafters": list(COPY)})
    assert isinstance(restored, ThompsonPolicy)
    restored.load_state_dict(saved)
    for context, arms in policy.copies_.items():
        np.testing.assert_array_equal(
            restored.copies_[context]["ngram"].posterior, arms["ngram"].posterior
        )
    assert restored.describe() == policy.describe()
    contexts = [CHAT, Context("chat", 1), Context("chat", 3)]
    assert [restored.select(c, DRAFTERS) for c in contexts * 20] == [
        policy.select(c, DRAFTERS) for c in contexts * 20
    ]


def test_a_version_1_state_loads_and_its_copy_drafter_starts_from_the_priors() -> None:
    policy = make_policy("thompson", DRAFTERS, {"seed": 4, "copy_drafters": list(COPY)})
    assert isinstance(policy, ThompsonPolicy)
    _train(policy, 40, match=0.5, keep=0.9)
    old = json.loads(json.dumps(policy.state_dict()))
    old["version"] = 1
    del old["copy"]  # what a build before the copy model saved
    restored = make_policy("thompson", DRAFTERS, {"seed": 4, "copy_drafters": list(COPY)})
    assert isinstance(restored, ThompsonPolicy)
    restored.load_state_dict(old)
    assert restored.version == policy.version and restored.copies_ == {}
    np.testing.assert_array_equal(restored.contexts_[CHAT].alpha, policy.contexts_[CHAT].alpha)
    assert restored.select(CHAT, DRAFTERS).k >= 0
    # A state saved with another copy_k_max loads too (positions padded or cut).
    shorter = make_policy(
        "thompson", DRAFTERS, {"seed": 4, "copy_drafters": list(COPY), "copy_k_max": 12}
    )
    shorter.load_state_dict(policy.state_dict())
    assert isinstance(shorter, ThompsonPolicy)
    assert shorter.copies_[CHAT]["ngram"].evidence.shape == (4, 48)  # H = 4 copy_k_max


def test_removing_the_copy_drafter_drops_its_statistics() -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    _train(policy, 30, match=0.5, keep=0.9)
    assert "ngram" in policy.copies_[CHAT]
    policy.remove_drafter("ngram")
    assert all("ngram" not in arms for arms in policy.copies_.values())
    assert "copy" in json.dumps(policy.state_dict())


def test_hints_set_at_run_time_price_as_hints_given_at_start() -> None:
    """A drafter registered while the sidecar runs gets its kind's hints then
    (``set_drafter_hints``); the policy then decides as one configured with them from the
    start, and a drafter that stops being a copy drafter loses its run statistics."""
    started = ThompsonPolicy(
        DRAFTERS,
        copy_drafters=COPY,
        costs=StepRatios(draft_cost_ratio={"ngram": 0.0}),
        rng=np.random.default_rng(0),
    )
    hinted = ThompsonPolicy(DRAFTERS, copy_drafters=(), rng=np.random.default_rng(0))
    hinted.set_drafter_hints(DrafterHints({"ngram": 0.0}, COPY))
    assert _train(hinted, 60, match=0.9, keep=0.35) == _train(started, 60, match=0.9, keep=0.35)
    assert hinted.costs_.draft_cost_ratio == {"ngram": 0.0}
    hinted.set_drafter_hints(DrafterHints())
    assert hinted.copy_drafters == frozenset() and hinted.copies_[CHAT] == {}
    assert hinted.costs_.draft_cost_ratio == {}


def test_a_new_length_bucket_starts_from_its_clusters_copy_evidence() -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    _train(policy, 60, match=0.5, keep=0.9)
    fresh = policy._copy_posterior(Context("chat", 2), "ngram")
    prior = policy._copy_posterior(Context("math", 2), "ngram")
    match = fresh[0, 0] / (fresh[0, 0] + fresh[1, 0])
    hazard = fresh[2] / (fresh[2] + fresh[3])
    assert 0.4 < match < 0.6 and hazard[10] > 0.9  # the cluster's match rate, whole copies
    # Another cluster: the priors alone (h_1 neutral, c and h_2 "kept").
    np.testing.assert_array_equal(prior, policy._new_copy("ngram", "math").posterior)
    assert prior[2, 0] == prior[3, 0] == 1.0 and prior[0, 0] / prior[:2, 0].sum() > 0.99
    assert prior[2, 1] / prior[2:, 1].sum() > 0.99
    # At most transfer_weight steps of evidence at position 1, plus the prior's weight 2.
    assert fresh[0, 0] + fresh[1, 0] <= policy.transfer_weight + 2.0 + 1e-9


SIGNER = EntrySigner(b"secret")


class Replica:
    """A sidecar's policy holder (thompson over generic and ngram, a real SQLite store)
    with its outcome log, as in the pooling units; entries travel by hand, not Redis."""

    def __init__(self, state_dir: Path, identity: str) -> None:
        self.store = SidecarStore(state_dir)
        self.holder = PolicyHolder(self.store, lambda: DRAFTERS, lambda name: None)
        self.holder.start("thompson", {"copy_drafters": list(COPY)})
        metrics = create_metrics()
        link = RedisLink(PoolingSettings(redis_url=SecretStr("redis://127.0.0.1:1/0")), metrics)
        self.writer = StreamWriter(link, SIGNER, "s", 1000, 1000)
        self.pool = OutcomePool(
            identity, self.holder, self.writer, StreamReader(link, "s"), SIGNER, metrics
        )
        self.holder.attach_log(self.pool)

    def copy_evidence(self) -> dict[Context, Any]:
        policy = self.holder._policy
        assert isinstance(policy, ThompsonPolicy)
        return {c: arms["ngram"].evidence.copy() for c, arms in policy.copies_.items()}


def test_copy_statistics_pool_across_replicas_and_survive_a_restart(tmp_path: Path) -> None:
    a = Replica(tmp_path / "a", "a-1")
    b = Replica(tmp_path / "b", "b-1")
    rng = np.random.default_rng(5)
    for k in (4, 16, 12):
        outcome = copy_outcome(rng, Decision("ngram", k), match=0.5, keep=0.8)
        a.holder.update(CHAT, Decision("ngram", k), outcome)
    a.holder.update_counterfactual(Context("chat", 1), "ngram", [5, 0, 2], 8)
    # A lookup's score with its drafted counts travels with them (c learnt there too).
    a.holder.update_counterfactual(Context("chat", 2), "ngram", [5, 0, 2], 8, [8, 0, 8])
    entries = [(f"{i}-0", SIGNER.fields(p)) for i, p in enumerate(a.writer._buffer, start=1)]
    b.pool.handle(entries)
    assert b.pool.applied == 5
    evidence = a.copy_evidence()
    assert evidence[CHAT][2, 12] > 0  # runs past 8 tokens were learnt
    assert evidence[Context("chat", 2)][1, 0] > 0  # an unmatched start, from the score
    pooled = b.copy_evidence()
    assert pooled.keys() == evidence.keys()
    for context, rows in evidence.items():
        np.testing.assert_allclose(pooled[context], rows)
    b.holder.snapshot()
    b.store.close()
    restarted = Replica(tmp_path / "b", "b-2")
    for context, rows in restarted.copy_evidence().items():
        np.testing.assert_allclose(rows, evidence[context])
    assert restarted.copy_evidence().keys() == evidence.keys()


def test_a_batch_with_a_copy_drafter_draws_like_calls_one_by_one() -> None:
    one = ThompsonPolicy(
        ["generic", "ngram", "code"], copy_drafters=COPY, rng=np.random.default_rng(8)
    )
    batch = ThompsonPolicy(
        ["generic", "ngram", "code"], copy_drafters=COPY, rng=np.random.default_rng(8)
    )
    for policy in (one, batch):
        _train(policy, 40, match=0.6, keep=0.5)
    contexts = [CHAT, Context("chat", 1), Context("code", 0), CHAT] * 5
    eligible = ["generic", "ngram", "code"]
    assert batch.select_many(contexts, eligible) == [one.select(c, eligible) for c in contexts]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["select", "update", "counterfactual", "remove", "add", "round"]),
            st.sampled_from(["generic", "ngram"]),
            st.integers(0, 3),
            st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), max_size=12),
        ),
        max_size=50,
    )
)
def test_copy_statistics_stay_proper_under_random_operations(operations: list) -> None:
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    for op, drafter, bucket, steps in operations:
        context = Context("chat" if bucket % 2 else "code", bucket)
        if op == "select":
            decision = policy.select(context, DRAFTERS)
            assert 0 <= decision.k <= (16 if decision.drafter == "ngram" else 8)
            assert np.isfinite(decision.expected_speedup) and decision.expected_speedup > 0
        elif op == "update":
            decision = policy.select(context, DRAFTERS)
            drafted = [min(d, decision.k) for d, _ in steps]
            accepted = [min(a, d) for (_, a), d in zip(steps, drafted, strict=True)]
            outcome = Outcome.from_steps(drafted, accepted, draft_time_s=0.01, verify_time_s=0.1)
            policy.update(context, decision, outcome)
        elif op == "counterfactual":
            policy.update_counterfactual(context, drafter, [a for a, _ in steps], bucket * 6)
        elif op == "remove":
            policy.remove_drafter(drafter)
        elif op == "add":
            policy.add_drafter(drafter)
        else:
            restored = ThompsonPolicy([], copy_drafters=COPY, rng=np.random.default_rng(1))
            restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
            policy = restored
        for arms in policy.copies_.values():
            for arm in arms.values():
                assert np.all(arm.evidence >= 0) and np.all(np.isfinite(arm.posterior))
                assert np.all(arm.posterior > 0)


def test_a_fresh_contexts_run_prior_is_derived_once_per_cluster_and_follows_similarity() -> None:
    """A context without run statistics of a copy drafter, in a cluster without any, is
    priced from the priors alone: derived once per (cluster, drafter) and again when the
    drafter's similarity changes, always what deriving it anew gives."""
    policy = ThompsonPolicy(DRAFTERS, copy_drafters=COPY, rng=np.random.default_rng(0))
    context = Context("code", 0)
    first = policy._copy_posterior(context, "ngram")
    assert policy._copy_posterior(Context("code", 2), "ngram") is first
    np.testing.assert_array_equal(first, policy._new_copy("ngram", "code").posterior)
    policy.add_drafter("ngram", {"code": 0.9, "chat": 0.1})
    similar = policy._copy_posterior(context, "ngram")
    assert similar[2, 0] / (similar[2, 0] + similar[3, 0]) > first[2, 0] / (
        first[2, 0] + first[3, 0]
    )
    np.testing.assert_array_equal(similar, policy._new_copy("ngram", "code").posterior)
    # Once another bucket of the cluster has runs, a fresh context borrows them instead.
    policy.update_counterfactual(context, "ngram", [4, 4, 0, 2], 4)
    borrowed = policy._copy_posterior(Context("code", 2), "ngram")
    assert not np.array_equal(borrowed, similar)


def test_a_model_drafter_served_past_k_max_is_chosen_beside_a_copy_drafter() -> None:
    """A fleet's model replica at k = 12 (past the default k_max 8) with an n-gram replica
    beside it: the copy drafter widened the speed-up table to 17 columns and the model
    drafter's columns past 8 were 0, so its one served length was priced 0 and it was
    never chosen however well it did (without a copy drafter it stood at column 8)."""
    rng = np.random.default_rng(0)
    lengths = {"generic": 12, "ngram": 4}
    chosen: Counter[str] = Counter()
    for copy in ((), COPY):
        policy = ThompsonPolicy(
            DRAFTERS, copy_drafters=copy, draft_length=lengths, rng=np.random.default_rng(1)
        )
        for _ in range(60):
            policy.update(
                CHAT, Decision("generic", 12), geometric_outcome(rng, Decision("generic", 12), 0.9)
            )
            policy.update(
                CHAT, Decision("ngram", 4), geometric_outcome(rng, Decision("ngram", 4), 0.1)
            )
        decisions = [policy.select(CHAT, DRAFTERS) for _ in range(100)]
        assert all(d.k in (0, lengths.get(d.drafter, 0)) for d in decisions)
        chosen.update(f"{bool(copy)}:{d.drafter}" for d in decisions)
    assert chosen["True:generic"] > 80 and chosen["False:generic"] > 80, chosen


def test_a_copy_drafter_served_past_copy_k_max_is_priced_at_its_longest() -> None:
    """The mirror case: copy_k_max 4 below k_max 8, the n-gram replica at k = 6. Its
    columns past 4 were 0: never chosen (`none` every time)."""
    rng = np.random.default_rng(0)
    policy = ThompsonPolicy(
        ["ngram", "generic"], k_max=8, copy_k_max=4, copy_drafters=COPY,
        draft_length={"ngram": 6}, rng=np.random.default_rng(1),
    )  # fmt: skip
    for _ in range(40):
        decision = Decision("ngram", 6)
        policy.update(CHAT, decision, copy_outcome(rng, decision, match=0.9, keep=0.95))
    decisions = Counter(
        (d.drafter, d.k) for d in (policy.select(CHAT, ["ngram"]) for _ in range(50))
    )
    assert decisions[("ngram", 6)] > 40, decisions


def test_the_policy_state_says_the_k_a_drafter_is_served_at() -> None:
    """GetPolicyState (describe) gave the column, 8, for a drafter served at 12."""
    rng = np.random.default_rng(0)
    policy = ThompsonPolicy(DRAFTERS, draft_length={"generic": 12}, rng=np.random.default_rng(1))
    for _ in range(30):
        decision = Decision("generic", 12)
        policy.update(CHAT, decision, geometric_outcome(rng, decision, 0.9))
    (summary,) = policy.describe()
    assert summary.chosen_drafter == "generic" and summary.chosen_k == 12
    assert {arm.drafter: arm.best_k for arm in summary.arms}["generic"] == 12


def test_runs_scored_by_counterfactuals_pass_to_a_new_bucket_capped() -> None:
    """A new bucket takes its cluster's other buckets' run evidence scaled to at most
    transfer_weight starts. Counted by the match counts c alone, as they were, 200
    counterfactual scores (which add run counts only) passed over unscaled (605
    pseudo-counts on h_1); now by c's counts or h_1's, whichever is larger."""
    policy = make_policy("thompson", ["a", "ngram"], {"copy_drafters": ["ngram"]})
    seen, new = Context("chat", 0), Context("chat", 1)
    for _ in range(200):
        policy.update_counterfactual(seen, "ngram", [0, 3, 0, 0, 1, 0, 4, 0], 4)
    transferred = policy._copy_posterior(new, "ngram") - policy._new_copy("ngram", "chat").posterior
    assert transferred[2, 0] + transferred[3, 0] == pytest.approx(16.0)  # transfer_weight


def test_a_scored_copy_drafter_is_decided_at_its_means_too() -> None:
    """A copy drafter's c and hazards replace their draws by their means when scores
    keep them up to date, like a model drafter's acceptance (``thompson_decisions``'s
    ``informed``, laid out as ``CopyTerms.parameters``): with both arms scored on every
    request, close arms are never explored; drawn, they are."""

    def explored(scored_window: int | None) -> int:
        policy = ThompsonPolicy(
            DRAFTERS, rng=np.random.default_rng(2), copy_drafters=COPY, scored_window=scored_window
        )
        rng = np.random.default_rng(5)
        count = 0
        for request in range(60):
            decision = policy.select(CHAT, DRAFTERS)
            count += request > 0 and decision.explored
            served = Decision(decision.drafter, decision.k or 4, 1.0, False)
            if decision.drafter == "ngram":
                outcome = copy_outcome(rng, served, match=0.5, keep=0.5, run_mean=4, tokens=12)
            else:
                outcome = geometric_outcome(rng, served, 0.65, tokens=12)
            policy.update(CHAT, served, outcome)
            other = "generic" if decision.drafter == "ngram" else "ngram"
            scored = Decision(other, served.k, 1.0, False)
            if other == "ngram":
                score = copy_outcome(rng, scored, match=0.5, keep=0.5, run_mean=4, tokens=12)
            else:
                score = geometric_outcome(rng, scored, 0.65, tokens=12)
            policy.update_counterfactual(
                CHAT, other, score.accepted_per_step, served.k, score.drafted_per_step
            )
        return count

    assert explored(16) == 0
    assert explored(None) >= 5
