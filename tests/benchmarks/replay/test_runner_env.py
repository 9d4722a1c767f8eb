"""The replay's own sidecar runs the built-in world in fp32 unless told otherwise."""

from __future__ import annotations

from benchmarks.replay.runner import replay_sidecar_env


def test_the_replay_sidecar_defaults_to_fp32_so_lossless_means_token_for_token() -> None:
    # bf16 verify passes can flip near-ties against one-token steps (docs/engine.md).
    assert replay_sidecar_env({})["SPECROUTE_DTYPE"] == "float32"


def test_the_callers_dtype_and_openmp_wait_policy_are_kept() -> None:
    env = replay_sidecar_env({"SPECROUTE_DTYPE": "bfloat16", "OMP_WAIT_POLICY": "ACTIVE"})
    assert env == {"SPECROUTE_DTYPE": "bfloat16", "OMP_WAIT_POLICY": "ACTIVE"}
