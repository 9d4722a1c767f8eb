"""Expected speed-up of speculative decoding for an acceptance rate and measured costs.

With per-token acceptance a (accepted tokens per step follow a geometric law truncated
at k), a step drafting k tokens emits on average

    L(a, k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a)

tokens (bonus token included) and costs ``k * t_draft + t_verify(k)``, against ``t_ar``
per token without speculation (Leviathan et al. 2023, arXiv 2211.17192), so

    S(a, k) = L(a, k) * t_ar / (k * t_draft + t_verify(k)),   S(a, 0) = 1.

Per-request fixed time (target prefill, drafter start, bookkeeping) is not in S: it is
paid once per request, so it matters against short outputs. With L expected output
tokens, F_0 the fixed time of a plain request and F_d that of a request drafted by d,

    S_req(a, k) = (F_0 + L * t_ar) / (F_d + (L / L(a, k)) * (k * t_draft + t_verify(k)))

which is S(a, k) when F_0 = F_d = 0 (``request_speedup``). Where a drafter's first
forward of a step is measured apart (it catches the drafter's cache up on the verified
tokens), k * t_draft reads t_lead + k * t_draft: a lead paid once per drafting step above
the per-token price of its further tokens (``cost_gain``).

Drafts a stop rule may end before k are priced by their expected length
(``stopped_draft_expectations``, ``stopped_speedup_table``; the model is stated above
them). Copy drafters (prompt lookup), whose steps may draft nothing and whose copies run
across steps, are priced by the length of their runs (``copy_request_speedup``; the
model is stated above it).

Everything is vectorised over acceptances (any leading shape) and draft lengths.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def expected_tokens_per_step(acceptance: npt.ArrayLike, k_max: int) -> FloatArray:
    """L(a, k) for k = 0..k_max: shape ``acceptance.shape + (k_max + 1,)``.

    Computed as a cumulative sum of powers, which stays exact at a = 1 where the
    closed form divides by zero.
    """
    a = np.asarray(acceptance, dtype=np.float64)
    powers = a[..., None] ** np.arange(k_max + 1)
    return np.cumsum(powers, axis=-1)


def cost_gain(
    t_ar: float,
    t_draft: npt.ArrayLike,
    t_verify: npt.ArrayLike,
    t_lead: npt.ArrayLike | None = None,
) -> FloatArray:
    """t_ar / (t_lead + k * t_draft + t_verify(k)) for each drafter and k, with 1 at k = 0.

    ``t_draft``: per-token draft time, shape (D,); ``t_verify``: verify time per step
    for k = 0..k_max, shape (k_max + 1,); ``t_lead`` (D,), or None for 0: what a
    draft's first forward costs above a further token's t_draft (it catches the
    drafter's cache up), paid once per step that drafts. Returns shape (D, k_max + 1).
    Column 0 is set to 1 so that S(a, 0) = L(a, 0) * 1 = 1 exactly (no speculation).
    """
    draft = np.asarray(t_draft, dtype=np.float64)
    verify = np.asarray(t_verify, dtype=np.float64)
    cost = np.arange(len(verify)) * draft[:, None] + verify
    if t_lead is not None:
        cost += np.asarray(t_lead, dtype=np.float64)[:, None]
    gain = t_ar / np.maximum(cost, 1e-12)
    gain[:, 0] = 1.0
    return gain


def speedup_table(acceptance: npt.ArrayLike, gain: FloatArray) -> FloatArray:
    """S(a, k) for acceptances of shape (..., D) and a gain of shape (D, K + 1)."""
    return expected_tokens_per_step(acceptance, gain.shape[-1] - 1) * gain


def request_speedup(
    acceptance: npt.ArrayLike,
    gain: FloatArray,
    *,
    t_ar: float,
    output_tokens: npt.ArrayLike,
    fixed_none: npt.ArrayLike,
    fixed_drafters: npt.ArrayLike,
) -> FloatArray:
    """S_req(a, k) (module doc) for acceptances (..., D), ``gain`` (D, K + 1) and the
    fixed times per request: ``fixed_none`` (plain) and ``fixed_drafters`` (D,).
    Column 0 stays 1 (no speculation). Rows of different contexts are priced at once
    by giving ``output_tokens`` and ``fixed_none`` shape (R,) and ``fixed_drafters``
    (R, D) for acceptances (R, D)."""
    tokens = expected_tokens_per_step(acceptance, gain.shape[-1] - 1)
    step_cost = t_ar / gain  # k * t_draft + t_verify(k); t_ar at k = 0
    length = np.asarray(output_tokens, dtype=np.float64)[..., None, None]
    plain = np.asarray(fixed_none, dtype=np.float64)[..., None, None]
    spent = length * step_cost / tokens  # F_d + (N / L) (k t_draft + t_verify(k)), in place
    spent += np.asarray(fixed_drafters, dtype=np.float64)[..., None]
    table = np.divide(plain + length * t_ar, np.maximum(spent, 1e-12, out=spent), out=spent)
    table[..., 0] = 1.0
    return table


def speedup(acceptance: float, k: int, *, t_ar: float, t_draft: float, t_verify: float) -> float:
    """S(a, k) for one arm, with ``t_verify`` the verify time of a k-token step."""
    if k == 0:
        return 1.0
    tokens = float(expected_tokens_per_step(acceptance, k)[k])
    return tokens * t_ar / (k * t_draft + t_verify)


def best_draft_length(table: FloatArray) -> tuple[npt.NDArray[np.intp], FloatArray]:
    """k* = argmax_k S and its S along the last axis (ties go to the smaller k)."""
    best_k = np.argmax(table, axis=-1)
    return best_k, np.take_along_axis(table, best_k[..., None], axis=-1)[..., 0]


# -- drafts stopped early (drafters/stopping.py) ---------------------------------------
#
# With a stop rule a step asks for k drafts but the drafter may end the draft sooner, so
# the price of an arm (drafter, k, threshold) is that of its expected draft, not of k.
# Model, per position i = 1..k (arrays over positions, any leading shape):
#
#   c_i  the probability that the drafter goes on to draft position i, given it drafted
#        i - 1 (the rule's continuation; c_1 = 1: the first draft is always made), taken
#        independent of whether the earlier drafts will be accepted (the rule reads only
#        the drafter's own distribution);
#   a_i  the probability that a drafted token i is accepted, given tokens 1..i-1 were.
#
# Position i is drafted with probability C_i = c_1 ... c_i and emitted with probability
# C_i A_i, A_i = a_1 ... a_i, so for a step asking for k drafts
#
#   E[tokens](k)  = 1 + sum_{i<=k} C_i A_i          (bonus or correction token included)
#   E[drafted](k) = sum_{i<=k} C_i
#   P(stop)(k)    = 1 - C_k                         (the rule ended the draft before k)
#
# and the step costs E[drafted] t_draft + P(stop) t_draft + t_verify(E[drafted]): a
# stopped draft has paid one more drafter forward, the one whose distribution stopped it,
# and the target verifies the drafts actually made (t_verify is a line in d, so its mean
# is its value at the mean). Constant a_i = a, c_i = 1 give L(a, k), k and 0, i.e. S(a, k).


def stopped_draft_expectations(
    acceptance: npt.ArrayLike, continuation: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(E[tokens], E[drafted], P(stop)) per step for k = 0..K (model above).

    ``acceptance`` a_i and ``continuation`` c_i have shape (..., K), position i = 1..K
    in the last axis (``continuation[..., 0]`` is ignored: the first draft is always
    made). Each result has shape (..., K + 1); k = 0 is plain decoding (1, 0, 0).
    """
    a = np.asarray(acceptance, dtype=np.float64)
    c = np.array(np.broadcast_to(continuation, a.shape), dtype=np.float64)
    c[..., :1] = 1.0
    drafted_prob = np.cumprod(c, axis=-1)  # C_i
    emitted_prob = drafted_prob * np.cumprod(a, axis=-1)  # C_i A_i
    zero = np.zeros((*a.shape[:-1], 1))
    tokens = 1.0 + np.concatenate([zero, np.cumsum(emitted_prob, axis=-1)], axis=-1)
    drafted = np.concatenate([zero, np.cumsum(drafted_prob, axis=-1)], axis=-1)
    stopped = np.concatenate([zero, 1.0 - drafted_prob], axis=-1)
    return tokens, drafted, stopped


def constant_positions(value: npt.ArrayLike, k_max: int) -> FloatArray:
    """A per-arm constant (..., ) repeated over positions 1..k_max: (..., k_max)."""
    v = np.asarray(value, dtype=np.float64)
    return np.repeat(v[..., None], k_max, axis=-1)


def stopped_speedup_table(
    acceptance: npt.ArrayLike,
    continuation: npt.ArrayLike,
    *,
    t_ar: float,
    t_draft: npt.ArrayLike,
    t_verify: npt.ArrayLike,
) -> FloatArray:
    """S for drafts stopped early, k = 0..K:

        S(k) = E[tokens](k) t_ar / ((E[drafted](k) + P(stop)(k)) t_draft
                                    + t_verify(E[drafted](k))),     S(0) = 1.

    ``acceptance`` and ``continuation``: (..., D, K) per drafter and position;
    ``t_draft`` (D,) per drafter forward; ``t_verify`` (K + 1,) the verify time of a step
    of d = 0..K drafts (a line, interpolated at the fractional E[drafted]). Returns
    (..., D, K + 1). With every c_i = 1 and constant a it equals ``speedup_table``.
    """
    tokens, drafted, stopped = stopped_draft_expectations(acceptance, continuation)
    verify = np.asarray(t_verify, dtype=np.float64)
    draft = np.asarray(t_draft, dtype=np.float64)[:, None]  # [D, 1]
    lengths = np.arange(len(verify), dtype=np.float64)
    cost = (drafted + stopped) * draft + np.interp(drafted, lengths, verify)
    table = tokens * t_ar / np.maximum(cost, 1e-12)
    table[..., 0] = 1.0
    return table


# -- copy drafters (prompt lookup, drafters/ngram.py) ------------------------------------
#
# A copy drafter drafts what followed an earlier occurrence of the text's suffix. A step
# either finds no match and drafts nothing (a plain verify step: it emits the target's
# one token), or copies up to k tokens, which the target keeps while it repeats itself.
# One per-token acceptance (the truncated geometric L(a, k) above) cannot describe that,
# and neither can a per-step law whose parameters do not depend on k: a repeated stretch
# is one step at a large k and several at a small one, so how often a step matches
# depends on k. What does not is the **run**: from where a lookup starts, the number R
# of tokens the copy matches (``copying.py``). With c the chance that a run start finds a
# match and h_i that a matched run goes on to token i given it reached i - 1,
#
#   P(R >= i) = h_1 ... h_i,    E[R] = sum_{i<=H} P(R >= i)       (R capped at H)
#
# and at draft length k a matched run of R tokens takes floor(R / (k + 1)) + 1 steps
# (each full step emits k + 1 tokens, its bonus token being the copy's next; the last
# one ends with the target's correction) and emits R + 1 tokens, each of its steps
# drafting k; an unmatched start is one step without drafts. Per run start:
#
#   E[tokens]     = c (1 + E[R]) + (1 - c)
#   E[steps](k)   = c (1 + sum_{j>=1} P(R >= j (k + 1))) + (1 - c)
#   E[drafted](k) = c k (1 + sum_{j>=1} P(R >= j (k + 1)))
#   E[cost](k)    = t0 c E[run steps](k) + t_e (1 - c) + (t_draft + t1) E[drafted](k)
#
# (t_verify(d) = t0 + t1 d for a step of d >= 1 drafts; an unmatched start's step verifies
# nothing, a one-position forward, t_e, which may cost less than t0 (``t_unmatched``;
# t0 when not given); a lookup runs no drafter forward: its time is in t_draft, measured
# per drafted token),
# and per request, with the fixed times and output length of ``request_speedup``,
#
#   S_req(k) = (F_0 + N t_ar) / (F_d + N E[cost](k) / E[tokens]).


def run_steps_matrix(horizon: int, k_max: int) -> FloatArray:
    """[H, K]: 1 where run length i (row i - 1) is a multiple of k + 1 (column k - 1), so
    that P(R >= i) @ it = sum_{j>=1} P(R >= j (k + 1)) for k = 1..K."""
    lengths = np.arange(1, horizon + 1)[:, None]
    return (lengths % np.arange(2, k_max + 2)[None, :] == 0).astype(np.float64)


def copy_request_speedup(
    match: npt.ArrayLike,
    hazard: npt.ArrayLike,
    *,
    k_max: int,
    t_ar: float,
    t_draft: npt.ArrayLike,
    verify_line: tuple[float, float],
    output_tokens: npt.ArrayLike,
    fixed_none: npt.ArrayLike,
    fixed_drafters: npt.ArrayLike,
    steps_matrix: FloatArray | None = None,
    t_unmatched: float | None = None,
) -> FloatArray:
    """S_req(k) of copy drafters (model above), k = 0..``k_max``.

    ``match`` c: (..., R, D) per request and drafter; ``hazard`` h_1..h_H: (..., R, D, H);
    ``t_draft`` (D,); ``verify_line`` (t0, t1); ``output_tokens`` and ``fixed_none`` (R,),
    ``fixed_drafters`` (R, D), as in ``request_speedup``; ``steps_matrix``
    ``run_steps_matrix(H, k_max)`` when the caller keeps it; ``t_unmatched`` t_e, an
    unmatched lookup's step (t0 when None). Returns (..., R, D, K + 1), 1 at k = 0."""
    c = np.asarray(match, dtype=np.float64)[..., None]
    reach = np.cumprod(np.asarray(hazard, dtype=np.float64), axis=-1)  # P(R >= i)
    matrix = steps_matrix if steps_matrix is not None else run_steps_matrix(reach.shape[-1], k_max)
    run_steps = reach @ matrix + 1.0  # E[floor(R / (k + 1))] + 1, k = 1..K
    tokens = c * reach.sum(axis=-1, keepdims=True) + 1.0  # c (1 + E[R]) + 1 - c
    t0, t1 = verify_line
    drafts = run_steps * (c * np.arange(1, k_max + 1))  # E[drafted](k)
    cost = c * run_steps * t0 + (1.0 - c) * (t0 if t_unmatched is None else t_unmatched)
    cost += drafts * (np.asarray(t_draft, dtype=np.float64)[:, None] + t1)
    length = np.asarray(output_tokens, dtype=np.float64)[..., None, None]
    spent = cost / tokens
    spent *= length
    spent += np.asarray(fixed_drafters, dtype=np.float64)[..., None]
    plain = np.asarray(fixed_none, dtype=np.float64)[..., None, None] + length * t_ar
    table = np.empty((*spent.shape[:-1], spent.shape[-1] + 1))
    table[..., 0] = 1.0
    np.divide(plain, np.maximum(spent, 1e-12, out=spent), out=table[..., 1:])
    return table
