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

which is S(a, k) when F_0 = F_d = 0 (``request_speedup``).

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


def cost_gain(t_ar: float, t_draft: npt.ArrayLike, t_verify: npt.ArrayLike) -> FloatArray:
    """t_ar / (k * t_draft + t_verify(k)) for each drafter and k, with 1 at k = 0.

    ``t_draft``: per-token draft time, shape (D,); ``t_verify``: verify time per step
    for k = 0..k_max, shape (k_max + 1,). Returns shape (D, k_max + 1). Column 0 is
    set to 1 so that S(a, 0) = L(a, 0) * 1 = 1 exactly (no speculation).
    """
    draft = np.asarray(t_draft, dtype=np.float64)
    verify = np.asarray(t_verify, dtype=np.float64)
    gain = t_ar / (np.arange(len(verify)) * draft[:, None] + verify)
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
