"""The measured cost models: ucb's seconds (draft time per drafter, the verify line, t_ar
measured or not) and thompson's ratios within each request, and per-request fixed times."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from router.policy.base import Context, Outcome
from router.policy.costs import CostModel, RequestOverheads, StepRatios

CODE = Context("code")


def _outcome(
    k: int,
    steps: int,
    *,
    t_ar: float = 0.01,
    draft: float = 0.002,
    slope: float = 0.1,
    plain: float | None = None,
) -> Outcome:
    return Outcome.from_steps(
        [k] * steps,
        [0] * steps,
        draft_time_s=steps * k * draft,
        verify_time_s=steps * (t_ar + slope * t_ar * k),
        plain_token_time_s=plain,
    )


def test_units_before_any_measurement() -> None:
    costs = CostModel(default_draft_cost_ratio=0.2, draft_cost_ratio={"ngram": 0.01})
    assert costs.plain_token_time() == 1.0
    assert list(costs.draft_times(["model", "ngram"])) == [0.2, 0.01]
    assert costs.verify_times(2) == pytest.approx([1.0, 1.05, 1.1])


def test_learns_the_verify_line_and_t_ar_without_plain_times() -> None:
    costs = CostModel()
    for k in (1, 2, 4, 6, 8) * 4:
        costs.observe("generic", _outcome(k, 20))
    t0, t1 = costs.verify_line() or (0, 0)
    # Exact data: t_verify(k) = 0.01 + 0.001 k; the intercept is the plain step time.
    assert t0 == pytest.approx(0.01, rel=0.05)
    assert t1 == pytest.approx(0.001, rel=0.1)
    assert costs.plain_token_time() == pytest.approx(0.01, rel=0.05)
    assert costs.draft_times(["generic"])[0] == pytest.approx(0.002)
    # An unmeasured drafter costs the default ratio times the estimated t_ar.
    assert costs.draft_times(["new"])[0] == pytest.approx(0.1 * 0.01, rel=0.05)


def test_one_k_only_uses_the_prior_slope() -> None:
    costs = CostModel(verify_slope_ratio=0.05)
    costs.observe("generic", _outcome(4, 10, slope=0.05))
    t0, t1 = costs.verify_line() or (0, 0)
    assert t0 == pytest.approx(0.01, rel=0.02)
    assert t1 == pytest.approx(0.05 * t0, rel=0.05)


def test_plain_decoding_outcomes_pin_t_ar() -> None:
    costs = CostModel()
    plain = Outcome.from_totals(
        steps=0,
        drafted_tokens=0,
        accepted_tokens=0,
        draft_time_s=0.0,
        verify_time_s=0.0,
        wall_time_s=0.5,
        generated_tokens=50,
    )
    costs.observe("none", plain)
    assert costs.plain_token_time() == pytest.approx(0.01)


def test_measured_plain_time_wins_and_averages() -> None:
    costs = CostModel(ewma=0.01)
    costs.observe("generic", _outcome(4, 10, plain=0.02))
    costs.observe("generic", _outcome(4, 10, plain=0.04))
    assert costs.plain_token_time() == pytest.approx(0.03)  # running mean while n < 1/ewma


def test_state_round_trip_through_json() -> None:
    costs = CostModel()
    for k in (1, 3, 5):
        costs.observe("generic", _outcome(k, 10))
    restored = CostModel()
    restored.load_state_dict(json.loads(json.dumps(costs.state_dict())))
    assert restored.verify_line() == pytest.approx(costs.verify_line())
    assert restored.draft_times(["generic"]) == pytest.approx(costs.draft_times(["generic"]))


def _with_fixed_time(outcome: Outcome, fixed: float) -> Outcome:
    return Outcome.from_steps(
        outcome.drafted_per_step,
        outcome.accepted_per_step,
        draft_time_s=outcome.draft_time_s,
        verify_time_s=outcome.verify_time_s,
        wall_time_s=outcome.draft_time_s + outcome.verify_time_s + fixed,
    )


def test_request_overheads_measure_each_arms_fixed_time_and_the_output_length() -> None:
    costs, overheads = StepRatios(), RequestOverheads()
    math, chat = Context("math"), Context("chat")
    for _ in range(20):
        for k, arm, fixed_s in ((0, "none", 0.02), (3, "generic", 0.05)):
            # One k, so the slope stays at its prior (0.05): a plain request is no point
            # of the verify line.
            outcome = _with_fixed_time(_outcome(k, 10, slope=0.05), fixed_s)
            overheads.observe(math, arm, outcome, costs.observe(arm, outcome))
    fixed_none, fixed = overheads.fixed_times(math, ["generic", "code"])
    # In units of the plain step (0.01 s): 2 and 5.
    assert fixed_none == pytest.approx(2.0, rel=0.05)
    # "code" was never measured here: priced like the cheapest measured drafter.
    assert fixed == pytest.approx([5.0, 5.0], rel=0.05)
    assert overheads.output_tokens(math) == pytest.approx(10.0)
    assert overheads.output_tokens(chat) is None
    restored = RequestOverheads()
    restored.load_state_dict(json.loads(json.dumps(overheads.state_dict())))
    assert restored.fixed_times(math, ["generic"])[1] == pytest.approx(fixed[:1])
    restored.forget_drafter("generic")
    assert restored.fixed_times(math, ["generic"])[1] == pytest.approx([fixed_none])


def test_a_structured_contexts_figures_are_its_own_and_survive_a_round_trip() -> None:
    """Fixed times and output lengths of a cluster's structured requests (a JSON answer
    is shorter than free text) are kept apart from its free text's, saved and restored."""
    costs, overheads = StepRatios(), RequestOverheads()
    free, structured = Context("math", 0), Context("math", 0, structured=True)
    for _ in range(20):
        for context, tokens, fixed_s in ((free, 40, 0.05), (structured, 10, 0.02)):
            outcome = _with_fixed_time(_outcome(3, tokens, slope=0.05), fixed_s)
            overheads.observe(context, "generic", outcome, costs.observe("generic", outcome))
    assert overheads.output_tokens(free) == pytest.approx(40.0)
    assert overheads.output_tokens(structured) == pytest.approx(10.0)
    restored = RequestOverheads()
    restored.load_state_dict(json.loads(json.dumps(overheads.state_dict())))
    for context in (free, structured):
        assert restored.output_tokens(context) == overheads.output_tokens(context)
        assert restored.fixed_times(context, ["generic"]) == overheads.fixed_times(
            context, ["generic"]
        )
    saved_steps = json.loads(json.dumps(costs.state_dict()))
    reloaded = StepRatios()
    reloaded.load_state_dict(saved_steps)
    assert reloaded.state_dict() == saved_steps


def test_drafters_of_one_cost_shape_share_their_fixed_time() -> None:
    """Model drafters of one architecture start up alike: their fixed times in a context
    are one figure (and one pooled excess), so two of them are compared on acceptance,
    not on the noise of the few requests each served there. Figures kept under a
    drafter's name before it had a shape seed the shape's; removing one drafter keeps
    the shape's figures for the others."""
    costs, overheads = StepRatios(), RequestOverheads()
    rag = Context("rag", 1)

    def observe(arm: str, fixed_s: float) -> None:
        outcome = _with_fixed_time(_outcome(3, 10, slope=0.05), fixed_s)
        overheads.observe(rag, arm, outcome, costs.observe(arm, outcome))

    for fixed_s in (0.05, 0.06, 0.07, 0.06):
        observe("qa", fixed_s)
    observe("rag", 0.09)  # one slow request of its own
    apart = overheads.fixed_times(rag, ["qa", "rag"])[1]
    assert apart == pytest.approx([6.0, 9.0], rel=0.05)
    overheads.set_cost_shapes({"qa": "qwen-tiny", "rag": "qwen-tiny", "ngram": "lookup"})
    shared = overheads.fixed_times(rag, ["qa", "rag"])[1]
    assert shared[0] == shared[1] == pytest.approx(6.0, rel=0.05)  # the qa figures seeded it
    observe("rag", 0.09)  # one more figure of the shape: both drafters' price moves
    moved = overheads.fixed_times(rag, ["qa", "rag"])[1]
    assert moved[0] == moved[1] > shared[0]
    overheads.forget_drafter("qa")
    assert overheads.fixed_times(rag, ["rag"])[1] == pytest.approx(moved[1:])
    assert list(overheads.fixed_[rag]) == ["qwen-tiny"]


def test_an_unmeasured_plain_arm_is_priced_so_drafting_is_not_overrated() -> None:
    costs, overheads = StepRatios(), RequestOverheads()
    for arm, fixed_s in (("generic", 0.05), ("code", 0.03)):
        outcome = _with_fixed_time(_outcome(2, 10, slope=0.05), fixed_s)
        overheads.observe(Context("qa"), arm, outcome, costs.observe(arm, outcome))
    fixed_none, fixed = overheads.fixed_times(Context("qa"), ["generic", "code", "new"])
    assert fixed_none == 0.0
    assert fixed == pytest.approx([5.0, 3.0, 3.0], rel=0.05)


def test_one_stalled_request_does_not_price_a_drafter_out_of_its_context() -> None:
    """What a drafter's fixed time adds to plain decoding's is pooled over a length
    bucket's contexts until a context has ``own_min`` requests of the drafter: a stall on
    its first request in a context (66 plain steps: a replica's first request) no longer
    prices it out there for good (it would not be chosen, so not measured, again)."""
    costs, overheads = StepRatios(), RequestOverheads()
    chat, summary, long_chat = Context("chat", 1), Context("summarization", 1), Context("chat", 2)

    def observe(context: Context, arm: str, k: int, fixed_s: float) -> None:
        outcome = _with_fixed_time(_outcome(k, 10, slope=0.05), fixed_s)
        overheads.observe(context, arm, outcome, costs.observe(arm, outcome))

    for _ in range(8):  # units of 0.01 s: plain 4, ngram 5 in chat
        observe(chat, "none", 0, 0.04)
        observe(chat, "ngram", 3, 0.05)
        observe(summary, "none", 0, 0.03)
    observe(summary, "ngram", 3, 0.66)
    assert overheads.fixed_times(summary, ["ngram"]) == (pytest.approx(3.0), pytest.approx([4.0]))
    # Own figures that agree with each other outvote the pool from the third on.
    qa = Context("qa", 1)
    observe(qa, "none", 0, 0.03)
    priced = []
    for _ in range(3):  # 10 units each; the pool says 3 + about 1
        observe(qa, "ngram", 3, 0.10)
        priced.append(float(overheads.fixed_times(qa, ["ngram"])[1][0]))
    assert priced[0] < 5.0 < priced[1] < 10.0 and priced[2] == pytest.approx(10.0)
    # Nothing pooled in another bucket: its own figure.
    observe(long_chat, "none", 0, 0.03)
    observe(long_chat, "ngram", 3, 0.66)
    assert overheads.fixed_times(long_chat, ["ngram"])[1] == pytest.approx([66.0])
    # With own_min requests of its own, the context's trimmed mean, which leaves the stall out.
    for _ in range(overheads.own_min - 1):
        observe(summary, "ngram", 3, 0.05)
    assert overheads.fixed_times(summary, ["ngram"])[1] == pytest.approx([5.0])
    restored = RequestOverheads()
    restored.load_state_dict(json.loads(json.dumps(overheads.state_dict())))
    assert restored.excess_.keys() == overheads.excess_.keys()
    restored.forget_drafter("ngram")
    assert not restored.excess_


def test_a_stalled_first_figure_is_outvoted_by_the_buckets_other_contexts() -> None:
    """Where no excess over plain decoding is pooled yet (early on, plain decoding is
    measured in a context only once drafting there has been priced out), a drafter's one
    figure in a context, taken while a busy spell met its prefill, was its price there:
    plain decoding then won at the means, and the drafter, never chosen again, was never
    measured again (qa under bursty load, 24 of 40 requests decoded plainly). The
    median of its figures in the bucket's other contexts outvotes it; a drafter with no
    figure in the context is priced as before."""
    costs, overheads = StepRatios(), RequestOverheads()
    qa = Context("qa", 1)

    def observe(context: Context, arm: str, k: int, fixed_s: float) -> None:
        outcome = _with_fixed_time(_outcome(k, 10, slope=0.05), fixed_s)
        overheads.observe(context, arm, outcome, costs.observe(arm, outcome))

    for cluster, fixed_s in (("code", 0.04), ("math", 0.05), ("rag", 0.045)):
        observe(Context(cluster, 1), "generic", 3, fixed_s)  # units of 0.01 s
    observe(qa, "generic", 3, 0.30)  # the stall
    observe(qa, "none", 0, 0.03)
    fixed_none, fixed = overheads.fixed_times(qa, ["generic"])
    assert fixed_none == pytest.approx(3.0) and fixed == pytest.approx([4.5])
    # Own figures that agree outvote it from the third on, as they outvote a pooled excess.
    observe(qa, "generic", 3, 0.10)
    observe(qa, "generic", 3, 0.10)
    assert overheads.fixed_times(qa, ["generic"])[1] == pytest.approx([10.0])
    # Another bucket, and a drafter not measured in the context: their figures as before.
    observe(Context("qa", 2), "generic", 3, 0.30)
    assert overheads.fixed_times(Context("qa", 2), ["generic"])[1] == pytest.approx([30.0])
    assert overheads.fixed_times(Context("chat", 1), ["generic"]) == (0.0, pytest.approx([0.0]))


def test_one_stalled_figure_in_the_pool_does_not_price_a_shape_out_of_its_bucket() -> None:
    """The pooled excess over plain decoding is a prior only with own_min figures: under
    bursty load one qa request whose prefill met a busy spell (0.098 s outside its steps,
    plain decoding 0.045 s) was the bucket's whole pool, and priced the model drafters out
    of summarization, which had not tried them, for the rest of the run."""
    costs, overheads = StepRatios(), RequestOverheads()
    qa, summary = Context("qa", 1), Context("summarization", 1)

    def observe(context: Context, arm: str, k: int, fixed_s: float) -> None:
        outcome = _with_fixed_time(_outcome(k, 10, slope=0.05), fixed_s)
        overheads.observe(context, arm, outcome, costs.observe(arm, outcome))

    observe(summary, "none", 0, 0.04)  # units of 0.01 s
    observe(summary, "ngram", 3, 0.05)
    observe(qa, "none", 0, 0.03)
    observe(qa, "generic", 3, 0.10)  # the stall: an excess of 7 units, alone in the pool
    # Not measured in summarization: the cheapest drafter measured there, not 4 + 7.
    assert overheads.fixed_times(summary, ["ngram", "generic"])[1] == pytest.approx([5.0, 5.0])
    for cluster in ("code", "math", "rag"):  # the pool fills with figures that agree
        observe(Context(cluster, 1), "none", 0, 0.03)
        observe(Context(cluster, 1), "generic", 3, 0.035)
    assert len(overheads.excess_[(1, "generic")]) == overheads.own_min
    # F_0 plus the pool's interquartile mean of 0.5, 0.5, 0.5, 7: the stall left out.
    assert overheads.fixed_times(summary, ["ngram", "generic"])[1] == pytest.approx([5.0, 4.5])


def _slowed(outcome: Outcome, draft: float, verify: float, fixed: float = 1.0) -> Outcome:
    """``outcome`` with its draft and verify times and its fixed time (wall time outside
    the steps) multiplied by the given factors."""
    outside = outcome.wall_time_s - outcome.draft_time_s - outcome.verify_time_s
    return Outcome.from_steps(
        outcome.drafted_per_step,
        outcome.accepted_per_step,
        draft_time_s=outcome.draft_time_s * draft,
        verify_time_s=outcome.verify_time_s * verify,
        wall_time_s=outcome.draft_time_s * draft + outcome.verify_time_s * verify + outside * fixed,
    )


def test_a_request_slowed_as_a_whole_measures_the_same_ratios() -> None:
    calm, loaded = StepRatios(), StepRatios()
    calm_fixed, loaded_fixed = RequestOverheads(), RequestOverheads()
    for i, k in enumerate((1, 2, 4, 6, 8) * 6):
        outcome = _with_fixed_time(_outcome(k, 10), 0.05)
        slow = 1.0 + 3.0 * (i // 5 % 3)  # spells of 5 requests at 1x, 4x, 7x: other work
        calm_fixed.observe(CODE, "generic", outcome, calm.observe("generic", outcome))
        stretched = _slowed(outcome, slow, slow, slow)
        loaded_fixed.observe(CODE, "generic", stretched, loaded.observe("generic", stretched))
    assert loaded.step_costs(["generic"], 8).t_draft == pytest.approx(
        calm.step_costs(["generic"], 8).t_draft
    )
    assert loaded_fixed.fixed_times(CODE, ["generic"])[1] == pytest.approx(
        calm_fixed.fixed_times(CODE, ["generic"])[1]
    )
    assert calm.step_costs(["generic"], 8).t_draft[0] == pytest.approx(0.2)  # 2 ms / 10 ms
    # The verify slope (0.1) comes from consecutive requests, which share a spell.
    assert loaded.slope() == pytest.approx(0.1) and calm.slope() == pytest.approx(0.1)


def test_stalls_in_one_phase_do_not_move_the_medians() -> None:
    # A tenth of the requests stall x10 in their draft phase or outside their steps (a
    # pause between two steps): means would move 90%, medians hardly.
    costs, overheads = StepRatios(), RequestOverheads()
    for i in range(40):
        outcome = _with_fixed_time(_outcome(4, 10, slope=0.05), 0.05)
        if i % 10 == 3:
            outcome = _slowed(outcome, 10.0, 1.0)
        if i % 10 == 7:
            outcome = _slowed(outcome, 1.0, 1.0, 10.0)
        overheads.observe(CODE, "generic", outcome, costs.observe("generic", outcome))
    assert costs.step_costs(["generic"], 4).t_draft[0] == pytest.approx(0.2, rel=0.01)
    assert overheads.fixed_times(CODE, ["generic"])[1][0] == pytest.approx(5.0, rel=0.01)


def test_step_ratios_state_round_trip_and_the_seconds_state_before() -> None:
    costs = StepRatios(default_draft_cost_ratio=0.3)
    for k in (1, 3, 5):
        costs.observe("generic", _outcome(k, 10, slope=0.05, plain=0.012))
    restored = StepRatios(default_draft_cost_ratio=0.3)
    restored.load_state_dict(json.loads(json.dumps(costs.state_dict())))
    before, after = (
        costs.step_costs(["generic", "new"], 8),
        restored.step_costs(["generic", "new"], 8),
    )
    assert after.t_ar == before.t_ar and list(after.t_draft) == list(before.t_draft)
    assert list(after.t_verify) == list(before.t_verify)
    # 12 ms measured plain against a 10 ms verify intercept.
    assert restored.plain_token_time() == pytest.approx(1.2, rel=0.05)
    # A state saved by the seconds-based model before starts the ratios afresh.
    seconds = CostModel()
    for k in (1, 3, 5):
        seconds.observe("generic", _outcome(k, 10))
    from_seconds = StepRatios(default_draft_cost_ratio=0.3)
    from_seconds.load_state_dict(json.loads(json.dumps(seconds.state_dict())))
    assert from_seconds.slope() == 0.05
    assert from_seconds.step_costs(["generic"], 1).t_draft[0] == pytest.approx(0.3)


def test_the_verify_slope_pairs_requests_of_one_context() -> None:
    # Long prompts (rag) make every step twice as slow as short ones (chat), and rag runs
    # at k = 8 where chat runs at 1-3: paired across contexts, the long prompts would pass
    # for a verify slope of ~0.6; paired within each context, the slope is the true 0.05.
    costs = StepRatios()
    rag, chat = Context("rag", 2), Context("chat", 0)
    for i in range(30):
        costs.observe("rag", _outcome(8 - i % 2, 10, t_ar=0.02, slope=0.05), rag)
        costs.observe("chat", _outcome(1 + i % 3, 10, slope=0.05), chat)
    assert costs.slope() == pytest.approx(0.05, rel=0.01)
    mixed = StepRatios()
    for i in range(30):
        mixed.observe("rag", _outcome(8 - i % 2, 10, t_ar=0.02, slope=0.05))
        mixed.observe("chat", _outcome(1 + i % 3, 10, slope=0.05))
    assert mixed.slope() > 0.3
    restored = StepRatios()
    restored.load_state_dict(json.loads(json.dumps(costs.state_dict())))
    assert restored.last_step_ == costs.last_step_


def test_drafters_of_one_shape_share_their_measured_cost() -> None:
    """Drafters fine-tuned from one base cost the same per drafted token: with their cost
    shape, each one's figures price all of them (one registered later included), where
    before each was priced from its own figures alone and the others from the default
    hint (0.1) until chosen; a drafter of another shape keeps its own cost."""
    shape = "model:hidden_size=128,num_hidden_layers=2"
    shapes = {"chat": shape, "code": shape, "later": shape}
    costs = StepRatios(cost_shape=shapes)
    alone = StepRatios()
    for k in (2, 4, 6) * 4:
        for model in (costs, alone):
            model.observe("chat", _outcome(k, 10, draft=0.004))  # 0.4 of a plain step
            model.observe("big", _outcome(k, 10, draft=0.008))
    chat, code, later, big, other = costs.step_costs(
        ["chat", "code", "later", "big", "other"], 8
    ).t_draft.tolist()
    assert chat == code == later == pytest.approx(0.4, rel=0.05)
    assert big == pytest.approx(0.8, rel=0.05) and other == pytest.approx(0.1)
    assert alone.step_costs(["code"], 8).t_draft[0] == pytest.approx(0.1)
    # Figures measured before a drafter had a shape seed that shape's window.
    alone.set_cost_shapes(shapes)
    assert alone.step_costs(["code"], 8).t_draft[0] == chat
    # Removing one drafter of a shape keeps the shape's figures for the others.
    costs.forget_drafter("chat")
    assert costs.step_costs(["code"], 8).t_draft[0] == chat
    costs.forget_drafter("big")
    assert costs.step_costs(["big"], 8).t_draft[0] == pytest.approx(0.1)
    restored = StepRatios(cost_shape=shapes)
    restored.load_state_dict(json.loads(json.dumps(costs.state_dict())))
    assert restored.step_costs(["later"], 8).t_draft[0] == chat
    # A state saved before drafters had shapes (figures under their names) restores
    # into its shapes: an upgrade loses no measured cost.
    upgraded = StepRatios(cost_shape=shapes)
    upgraded.load_state_dict(
        json.loads(
            json.dumps(
                StepRatios().state_dict()
                | {"draft_ratios": {"code": list(costs.draft_[shape].samples)}}
            )
        )
    )
    assert upgraded.step_costs(["chat"], 8).t_draft[0] == chat


def _led(k: int, steps: int, *, lead: float, further: float, timed: bool = True) -> Outcome:
    """k drafts a step: a first forward of ``lead`` seconds and ``further`` per further
    token, timed apart (``draft_lead_*``, ``draft_further_*``) or as totals only; verify at
    the prior slope."""
    return Outcome.from_steps(
        [k] * steps,
        [0] * steps,
        draft_time_s=steps * (lead + (k - 1) * further),
        verify_time_s=steps * 0.01 * (1 + 0.05 * k),
        draft_lead_steps=steps if timed else 0,
        draft_lead_time_s=steps * lead if timed else 0.0,
        draft_further_forwards=steps * (k - 1) if timed else 0,
        draft_further_time_s=steps * (k - 1) * further if timed else 0.0,
    )


def test_a_drafts_first_forward_is_priced_apart_from_its_further_tokens() -> None:
    """A model drafter's draft of k costs its first forward (the cache's catch-up) plus a
    cheaper forward per further token: priced as t_lead + k t_draft in units, where one
    mean price per token, taken at the k served, overpriced long drafts (k = 8 at k = 2's
    mean: 1.1 against 0.45 units here)."""
    costs = StepRatios()
    for k in (2, 4, 2, 4):  # totals first: one mean price per token
        costs.observe("math", _led(k, 10, lead=0.001, further=0.0003, timed=False))
    step = costs.step_costs(["math"], 8)
    assert step.t_lead is not None and step.t_lead[0] == 0.0
    assert step.t_draft[0] > 0.04
    for k in (2, 4, 2, 4):  # timed apart: the mean prices drafts no more
        costs.observe("math", _led(k, 10, lead=0.001, further=0.0003))
    step = costs.step_costs(["math"], 8)
    assert step.t_draft[0] == pytest.approx(0.03)
    assert step.t_lead is not None and step.t_lead[0] == pytest.approx(0.07)
    assert step.t_lead[0] + 8 * step.t_draft[0] == pytest.approx(0.1 + 7 * 0.03)
    # Once a drafter is priced by timed figures, a request that reports totals only (a
    # Report) adds no mean per token, which holds the lead, to them; a k = 1 request, a
    # lead only; a copy-or-model request's untimed copies (the rest of its draft time)
    # are left out of its further forwards' price.
    timed = StepRatios()
    timed.observe("math", _led(4, 10, lead=0.001, further=0.0003))
    timed.observe("math", _led(4, 10, lead=0.001, further=0.0003, timed=False))
    timed.observe("math", _led(1, 10, lead=0.001, further=0.0003))
    assert len(timed.draft_["math"]) == 1 and len(timed.lead_["math"]) == 2
    copies = replace(
        _led(4, 10, lead=0.001, further=0.0003), draft_time_s=0.022, draft_lead_steps=5
    )  # 5 model steps timed, 5 copies at no forward; per-forward prices as before
    copies = replace(copies, draft_lead_time_s=0.005, draft_further_time_s=0.0045)
    copies = replace(copies, draft_further_forwards=15)
    timed.observe("math", copies)
    assert list(timed.draft_["math"].samples) == pytest.approx([0.03, 0.03])
    assert list(timed.lead_["math"].samples) == pytest.approx([0.1] * 3)
    # Kept across a restart; a drafter removed takes its lead along.
    restored = StepRatios()
    restored.load_state_dict(json.loads(json.dumps(costs.state_dict())))
    assert restored.step_costs(["math"], 8).t_lead[0] == pytest.approx(0.07)
    restored.forget_drafter("math")
    assert restored.step_costs(["math"], 8).t_lead[0] == 0.0


def test_one_stalled_first_request_does_not_price_a_drafter_out() -> None:
    """The first measurement alone set a drafter's draft cost: one request whose draft
    time held a 3 s stall (a GPU's lazy start) priced it at ten plain steps a token, and
    a drafter never chosen again is never measured again. Until it has
    ``draft_prior_weight`` samples its hint fills the median; then its samples alone."""
    costs = StepRatios()
    stalled = _outcome(4, 10, draft=0.002)
    stalled = Outcome.from_steps(
        stalled.drafted_per_step,
        stalled.accepted_per_step,
        draft_time_s=stalled.draft_time_s + 3.0,
        verify_time_s=stalled.verify_time_s,
    )
    costs.observe("generic", stalled)
    assert costs.step_costs(["generic"], 8).t_draft[0] == pytest.approx(0.1)  # the hint
    for _ in range(3):
        costs.observe("generic", _outcome(4, 10, draft=0.002))
    # Four samples, one a stall: their own robust location, the stall left out.
    unit = 0.01 * (1 + 0.1 * 4) / (1 + 0.05 * 4)  # a step's time over the prior slope's
    assert costs.step_costs(["generic"], 8).t_draft[0] == pytest.approx(0.002 / unit)


def _mixed(matched: int, unmatched: int, *, unit: float, plain: float, k: int = 3) -> Outcome:
    """A lookup's request: ``matched`` steps drafting k (verify u (1 + 0.05 k) each) and
    ``unmatched`` steps drafting nothing, one-position forwards of ``plain`` seconds,
    timed apart in the request (``plain_steps_time_s``)."""
    drafted = [k] * matched + [0] * unmatched
    return Outcome.from_steps(
        drafted,
        [0] * len(drafted),
        draft_time_s=matched * k * 0.1 * unit,
        verify_time_s=matched * unit * (1 + 0.05 * k) + unmatched * plain,
        plain_steps_time_s=unmatched * plain,
    )


def test_steps_that_drafted_nothing_price_plain_decoding_apart_from_the_intercept() -> None:
    """On a CPU a one-position forward (plain decoding, a lookup without a match) may cost
    far less than the speculative step's intercept (~6 against ~9 ms on the built-in
    world). Timed apart in the same request, they give t_ar and the unmatched lookup's
    step in units (q, t_e) and stay out of the unit, the draft ratio and the slope; the
    plain arm's fixed time, kept in its own step, is priced in the speculative unit."""
    costs, overheads = StepRatios(), RequestOverheads()
    for _ in range(6):
        unit = costs.observe("ngram", _mixed(4, 6, unit=0.009, plain=0.006), CODE)
        assert unit == pytest.approx(0.009)
    assert costs.plain_token_time() == pytest.approx(6 / 9)
    assert costs.empty_step() == pytest.approx(6 / 9)
    assert costs.step_costs(["ngram"], 3).t_draft[0] == pytest.approx(0.1)
    assert costs.slope() == pytest.approx(0.05)
    # A plain request: steps of 6 ms and 18 ms outside them, 3 of its steps, 2 units of 9 ms.
    plain = _with_fixed_time(_outcome(0, 10, t_ar=0.006), 0.018)
    unit = costs.observe("none", plain, CODE)
    assert unit == pytest.approx(0.006)
    overheads.observe(CODE, "none", plain, unit, costs.plain_token_time())
    assert overheads.fixed_times(CODE, [])[0] == pytest.approx(3.0)
    assert overheads.fixed_times(CODE, [], costs.plain_token_time())[0] == pytest.approx(2.0)
    # A plain time measured elsewhere (a fleet's plain replica, a client) is no measure of
    # this request's own steps: the request's totals give the unit, as before.
    elsewhere = StepRatios()
    outcome = _mixed(4, 6, unit=0.009, plain=0.006)
    outcome = Outcome.from_steps(
        outcome.drafted_per_step,
        outcome.accepted_per_step,
        draft_time_s=outcome.draft_time_s,
        verify_time_s=outcome.verify_time_s,
        plain_token_time_s=0.006,
    )
    total_unit = outcome.verify_time_s / 10 / (1 + 0.05 * 1.2)
    assert elsewhere.observe("ngram", outcome) == pytest.approx(total_unit)
    assert elsewhere.plain_token_time() == pytest.approx(0.006 / total_unit)
    assert elsewhere.empty_step() == 1.0


def test_a_plain_request_pairs_for_the_slope_at_its_step_over_t_e() -> None:
    """Paired with a speculative request at face value, a one-position forward's cheaper
    step (6 ms against a 9 ms intercept) passed for a dearer verify position: 0.17
    instead of 0.05 at k = 4. Over the measured t_e it stands at the intercept. A state
    saved before t_e was measured measures its slope afresh."""
    costs = StepRatios()
    costs.observe("ngram", _mixed(4, 6, unit=0.009, plain=0.006), CODE)  # t_e = 2/3
    for k in (0, 4) * 5:
        costs.observe("generic", _outcome(k, 10, t_ar=0.006 if k == 0 else 0.009, slope=0.05))
    assert costs.slope() == pytest.approx(0.05)
    state = json.loads(json.dumps(costs.state_dict()))
    restored = StepRatios()
    restored.load_state_dict(state)
    assert restored.slope_.samples == costs.slope_.samples
    del state["empty_ratios"]
    state["slopes"] = [0.17] * 8
    older = StepRatios()
    older.load_state_dict(state)
    assert older.slope() == pytest.approx(0.05) and not older.last_step_
