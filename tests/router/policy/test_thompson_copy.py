"""Thompson's copy-drafter model (router/policy/copying.py): censored per-position counts,
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
from router.policy.base import STATE_VERSION, Context, Decision, Outcome
from router.policy.copying import counterfactual_counts, step_counts
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


def copy_outcome(
    rng: np.random.Generator,
    decision: Decision,
    *,
    match: float,
    keep: float,
    rejected_acceptance: float = 0.0,
    tokens: int = 100,
    draft_cost: float = 0.01,
    verify_slope: float = 0.05,
) -> Outcome:
    """A prompt-lookup request: a step matches with probability ``match`` and copies k
    tokens, kept whole with probability ``keep``, else accepted geometrically with
    ``rejected_acceptance`` (0: rejected at once); an unmatched step drafts nothing."""
    k = decision.k
    drafted: list[int] = []
    accepted: list[int] = []
    while sum(accepted) + len(accepted) < tokens:
        if rng.random() < match:
            whole = rng.random() < keep
            run = k if whole else min(k - 1, int(rng.geometric(1.0 - rejected_acceptance)) - 1)
            drafted.append(k)
            accepted.append(run)
        else:
            drafted.append(0)
            accepted.append(0)
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
) -> list[Decision]:
    """``generic`` at a per-token acceptance of 0.5, ``ngram`` as ``copy_outcome``."""
    rng = np.random.default_rng(seed)
    decisions = []
    for _ in range(requests):
        decision = policy.select(CHAT, DRAFTERS)
        if decision.drafter == "ngram":
            outcome = copy_outcome(
                rng, decision, match=match, keep=keep, rejected_acceptance=rejected_acceptance
            )
        else:
            outcome = geometric_outcome(rng, decision, 0.5)
        policy.update(CHAT, decision, outcome)
        decisions.append(decision)
    return decisions


def test_step_counts_are_censored_at_what_each_step_reached() -> None:
    """k = 4; steps (drafted, accepted): (4, 4), (0, 0) no match, (2, 1) the copy ended
    at 2, (4, 2). Positions 5 and 6 (past k) get nothing."""
    counts = step_counts([4, 0, 2, 4], [4, 0, 1, 2], 4, 6)
    np.testing.assert_array_equal(counts[0], [3, 3, 2, 2, 0, 0])  # c: drafted
    np.testing.assert_array_equal(counts[1], [1, 0, 1, 0, 0, 0])  # c: ended before k
    np.testing.assert_array_equal(counts[2], [3, 2, 1, 1, 0, 0])  # a: accepted
    np.testing.assert_array_equal(counts[3], [0, 1, 1, 0, 0, 0])  # a: rejected
    # A k larger than the positions modelled is clipped; k = 0 says nothing.
    assert step_counts([8], [8], 8, 4)[0].tolist() == [1, 1, 1, 1]
    assert not step_counts([0, 0], [0, 0], 0, 4).any()


def test_positions_past_the_asked_k_are_unknown_not_failed() -> None:
    """Only k = 4 played, every matched copy kept whole: positions 5..16 carry no
    evidence, so they are expected to behave like position 4 (kept) and k = 16 is the
    arm to try next, where counting the steps as stopped at 4 would price k = 4."""
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        decision = Decision("ngram", 4)
        policy.update(CHAT, decision, copy_outcome(rng, decision, match=0.6, keep=1.0))
    evidence = policy.copies_[CHAT]["ngram"].evidence
    assert evidence[0, 3] > 0 and not evidence[:, 4:].any()
    c_mean, a_mean = policy.copies_[CHAT]["ngram"].means()
    assert c_mean[15] > 0.9 and a_mean[15] > 0.9
    ngram = next(arm for arm in policy.describe()[0].arms if arm.drafter == "ngram")
    assert ngram.best_k == 16


def test_a_copy_seen_only_at_k_1_is_expected_to_go_on() -> None:
    """A first token right 30% of the time says nothing of the copy after it: position 2
    starts from "kept", not from position 1, so the long draft is the one to try."""
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(3):
        decision = Decision("ngram", 1)
        policy.update(CHAT, decision, copy_outcome(rng, decision, match=0.7, keep=0.3))
    c_mean, a_mean = policy.copies_[CHAT]["ngram"].means()
    assert a_mean[0] < 0.5 and c_mean[0] < 0.85
    assert a_mean[1] > 0.99 and c_mean[1] > 0.99
    ngram = next(arm for arm in policy.describe()[0].arms if arm.drafter == "ngram")
    assert ngram.best_k == 16


def test_counterfactual_failures_count_against_acceptance_by_the_chance_of_a_draft() -> None:
    """c = a = 0.5: a failure was "drafted and rejected" with c (1 - a) / (1 - c a) = 1/3;
    a score cannot tell how many steps drafted nothing, so c learns nothing from it."""
    half = np.full(3, 0.5)
    counts = counterfactual_counts([0, 2], 3, 3, half, half)
    assert not counts[:2].any()
    np.testing.assert_allclose(counts[2], [1, 1, 0])
    np.testing.assert_allclose(counts[3], [1 / 3, 0, 1 / 3])
    # A drafter known to draft every step: every failure is a rejection.
    counts = counterfactual_counts([0, 2], 3, 3, np.ones(3), half)
    np.testing.assert_allclose(counts[3], [1, 0, 1])


def test_a_score_does_not_pull_the_match_rate_away_from_own_outcomes() -> None:
    """Own outcomes show half the steps drafting nothing; many counterfactual scores of
    the same drafter leave c_1 there and learn a_1 as the chance of a kept first token
    given a draft, not the product c_1 a_1 the score shows."""
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        decision = Decision("ngram", 8)
        policy.update(CHAT, decision, copy_outcome(rng, decision, match=0.5, keep=0.6))
    for _ in range(200):  # scores: a step accepts 8 with 0.5 * 0.6, else 0
        accepted = np.where(rng.random(40) < 0.3, 8, 0).tolist()
        policy.update_counterfactual(CHAT, "ngram", accepted, 8)
    c_mean, a_mean = policy.copies_[CHAT]["ngram"].means()
    assert 0.4 < c_mean[0] < 0.6
    assert 0.5 < a_mean[0] < 0.7
    # Scores alone leave c_1 at its prior "it drafts" (priced with every draft made).
    other = Context("math", 0)  # no sibling context to transfer from
    for _ in range(50):
        policy.update_counterfactual(other, "ngram", [0, 0, 8, 0], 8)
    assert policy.copies_[other]["ngram"].means()[0][0] > 0.98


#: Nine steps in ten find a match; a copy is kept whole in 35% of them and rejected at
#: once otherwise. Truth: E[tokens](k) = 1 + 0.315 k, so S(16) = 6.04 / 1.864 = 3.24
#: against S(8) = 3.52 / 1.432 = 2.46 (t_draft 0.01, verify slope 0.05).
WHOLE_OR_NOTHING = (0.9, 0.35)


def test_copies_kept_whole_make_thompson_draft_more_than_eight() -> None:
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
    decisions = _train(policy, 150, match=WHOLE_OR_NOTHING[0], keep=WHOLE_OR_NOTHING[1])
    last = Counter((d.drafter, d.k) for d in decisions[-50:])
    assert sum(n for (drafter, k), n in last.items() if drafter == "ngram" and k > 8) >= 45
    summary = policy.describe()[0]
    assert (summary.chosen_drafter, summary.chosen_k) == ("ngram", 16)
    ngram = next(arm for arm in summary.arms if arm.drafter == "ngram")
    assert ngram.best_k == 16 and 2.9 < ngram.expected_speedup < 3.6


def test_the_geometric_price_of_the_same_copies_stays_at_eight_or_below() -> None:
    """The same outcomes with the n-gram drafter priced like a model drafter (no copy
    drafters) and k_max 16: the per-token acceptance (about 0.8 at k = 8) flattens the
    price of long drafts."""
    policy = ThompsonPolicy(DRAFTERS, k_max=16, copy_drafters=(), rng=np.random.default_rng(0))
    decisions = _train(policy, 150, match=WHOLE_OR_NOTHING[0], keep=WHOLE_OR_NOTHING[1])
    assert all(d.k <= 8 for d in decisions[-50:] if d.drafter == "ngram")


@pytest.mark.parametrize(
    ("match", "keep", "rejected"),
    [(0.15, 0.1, 0.0), (0.9, 0.0, 0.3)],
    ids=["rare-matches", "copies-rejected-early"],
)
def test_rare_or_rejected_copies_keep_drafts_short(
    match: float, keep: float, rejected: float
) -> None:
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(1))
    decisions = _train(policy, 150, seed=1, match=match, keep=keep, rejected_acceptance=rejected)
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
    a policy without copy drafters makes the same decisions from the same draws."""
    policy = make_policy("thompson", ["generic", "code", "math"], {"seed": 3})
    assert isinstance(policy, ThompsonPolicy)
    assert _decision_digest(policy) == "8e93687f7c0e614a"


def test_model_drafters_rows_are_priced_as_before_beside_a_copy_drafter() -> None:
    policy = ThompsonPolicy(["generic", "ngram", "code"], rng=np.random.default_rng(2))
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
    assert not table[0, [0, 2], 9:].any()  # model drafters stop at k_max 8


def test_state_round_trip_keeps_the_copy_statistics() -> None:
    policy = make_policy("thompson", DRAFTERS, {"seed": 4})
    assert isinstance(policy, ThompsonPolicy)
    _train(policy, 60, match=0.5, keep=0.9)
    policy.update_counterfactual(Context("chat", 1), "ngram", [3, 0, 8], 8)
    saved = json.loads(json.dumps(policy.state_dict()))
    assert saved["version"] == STATE_VERSION == 2
    assert {(c, b, d) for c, b, d, _ in saved["copy"]["arms"]} == {
        ("chat", 0, "ngram"),
        ("chat", 1, "ngram"),
    }
    restored = make_policy("thompson", [], {"seed": 99})
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
    policy = make_policy("thompson", DRAFTERS, {"seed": 4})
    assert isinstance(policy, ThompsonPolicy)
    _train(policy, 40, match=0.5, keep=0.9)
    old = json.loads(json.dumps(policy.state_dict()))
    old["version"] = 1
    del old["copy"]  # what a build before the copy model saved
    restored = make_policy("thompson", DRAFTERS, {"seed": 4})
    assert isinstance(restored, ThompsonPolicy)
    restored.load_state_dict(old)
    assert restored.version == policy.version and restored.copies_ == {}
    np.testing.assert_array_equal(restored.contexts_[CHAT].alpha, policy.contexts_[CHAT].alpha)
    assert restored.select(CHAT, DRAFTERS).k >= 0
    # A state saved with another copy_k_max loads too (positions padded or cut).
    shorter = make_policy("thompson", DRAFTERS, {"seed": 4, "copy_k_max": 12})
    shorter.load_state_dict(policy.state_dict())
    assert isinstance(shorter, ThompsonPolicy)
    assert shorter.copies_[CHAT]["ngram"].evidence.shape == (4, 12)


def test_removing_the_copy_drafter_drops_its_statistics() -> None:
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
    _train(policy, 30, match=0.5, keep=0.9)
    assert "ngram" in policy.copies_[CHAT]
    policy.remove_drafter("ngram")
    assert all("ngram" not in arms for arms in policy.copies_.values())
    assert "copy" in json.dumps(policy.state_dict())


def test_a_new_length_bucket_starts_from_its_clusters_copy_evidence() -> None:
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
    _train(policy, 60, match=0.5, keep=0.9)
    fresh = policy._copy_posterior(Context("chat", 2), "ngram")
    prior = policy._copy_posterior(Context("math", 2), "ngram")
    c_mean = fresh[0] / (fresh[0] + fresh[1])
    assert 0.4 < c_mean[0] < 0.6 and c_mean[10] > 0.9  # the cluster's match rate, whole copies
    # Another cluster: the priors alone (a_1 neutral, c_1 and position 2 "kept").
    np.testing.assert_array_equal(prior, policy._new_copy("ngram", "math").posterior)
    assert prior[2, 0] == prior[3, 0] == 1.0 and prior[0, 1] / prior[:2, 1].sum() > 0.99
    # At most transfer_weight steps of evidence at position 1, plus the prior's weight 2.
    assert fresh[0, 0] + fresh[1, 0] <= policy.transfer_weight + 2.0 + 1e-9


SIGNER = EntrySigner(b"secret")


class Replica:
    """A sidecar's policy holder (thompson over generic and ngram, a real SQLite store)
    with its outcome log, as in the pooling units; entries travel by hand, not Redis."""

    def __init__(self, state_dir: Path, identity: str) -> None:
        self.store = SidecarStore(state_dir)
        self.holder = PolicyHolder(self.store, lambda: DRAFTERS, lambda name: None)
        self.holder.start("thompson")
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
    entries = [(f"{i}-0", SIGNER.fields(p)) for i, p in enumerate(a.writer._buffer, start=1)]
    b.pool.handle(entries)
    assert b.pool.applied == 4
    evidence = a.copy_evidence()
    assert evidence[CHAT][0, 12] > 0  # positions past 8 were learnt
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
    one = ThompsonPolicy(["generic", "ngram", "code"], rng=np.random.default_rng(8))
    batch = ThompsonPolicy(["generic", "ngram", "code"], rng=np.random.default_rng(8))
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
    policy = ThompsonPolicy(DRAFTERS, rng=np.random.default_rng(0))
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
            restored = ThompsonPolicy([], rng=np.random.default_rng(1))
            restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
            policy = restored
        for arms in policy.copies_.values():
            for arm in arms.values():
                assert np.all(arm.evidence >= 0) and np.all(np.isfinite(arm.posterior))
                assert np.all(arm.posterior > 0)
