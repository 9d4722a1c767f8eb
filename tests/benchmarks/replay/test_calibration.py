"""Calibration against a machine whose speed changes while it measures (a fake client)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.replay.calibration import CalibrationOptions, calibrate
from benchmarks.replay.client import ArmPin, DrafterEntry
from benchmarks.replay.metrics import RequestResult
from benchmarks.replay.trace import TraceRequest

# True speed-up of each arm on the one task; anything else is 1.
TRUE = {("code", 4): 1.25, ("code", 6): 1.35, ("generic", 4): 1.1}


class SlowingMachine:
    """Plain decoding at 100 tokens/s, 15% slower for every arm once the probe pass is
    over."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, request: TraceRequest, *, pin: ArmPin, **_: Any) -> RequestResult:
        self.calls += 1
        # Warm-up (plain and generic on the one prompt), then the probes (plain, two drafters).
        slowdown = 1.15 if self.calls > 2 + 3 else 1.0
        speedup = TRUE.get((pin.drafter, pin.draft_length), 1.0)
        tokens = 100
        return RequestResult(
            index=0, request_id=request.id, task="code", cluster="code",
            drafter=pin.drafter, draft_length=pin.draft_length, explored=False, greedy=True,
            prompt_tokens=10, generated_tokens=tokens, steps=tokens, drafted=0, accepted=0,
            wall_time_s=tokens / (100.0 * speedup) * slowdown,
        )  # fmt: skip


def test_a_swept_arm_is_priced_against_plain_decoding_of_its_own_pass() -> None:
    """The k sweep divided by the probe pass's plain tokens/s, measured before the machine
    slowed: the task drafter's k=6 (1.35x) read 1.17x and the tables chose k=4."""
    request = TraceRequest(id="r0", task="code", prompt="p", max_new_tokens=100)
    drafters = [
        DrafterEntry("generic", "model", "", (), True),
        DrafterEntry("code", "model", "", ("code",), True),
    ]
    options = CalibrationOptions(prompts_per_task=1, k_grid=(4, 6), top_drafters=0, progress=False)
    calibration = calibrate(SlowingMachine(), {"code": [request]}, drafters, options)  # type: ignore[arg-type]
    assert calibration.arms["code"]["code:6"] == pytest.approx(1.35)
    assert (calibration.oracle["code"].drafter, calibration.oracle["code"].k) == ("code", 6)


class Recorder(SlowingMachine):
    """The slowing machine, serving the generic drafter, recording the arms it is asked."""

    def __init__(self) -> None:
        super().__init__()
        self.pins: list[ArmPin] = []

    def list_drafters(self) -> list[DrafterEntry]:
        return [DrafterEntry("generic", "model", "", (), True)]

    def generate(self, request: TraceRequest, *, pin: ArmPin, **rest: Any) -> RequestResult:
        self.pins.append(pin)
        return super().generate(request, pin=pin, **rest)


def _study_with_saved_calibration(
    tiny_world: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, **saved_fields: Any
) -> tuple[Recorder, Any]:
    """A study (its replays left out) in a folder holding a calibration.json of the generic
    drafter, 1 prompt a task at k 4, on ``tiny_world`` unless ``saved_fields`` say
    otherwise; its client and its calibration."""
    import json

    from benchmarks.replay import study
    from benchmarks.replay.calibration import Calibration

    fields: dict[str, Any] = {
        "method": "saved",
        "prompts_per_task": 1,
        "probe_k": 4,
        "acceptance": {"generic": {"code": 0.5}},
        "world": str(tiny_world.root),
        **saved_fields,
    }
    (tmp_path / "calibration.json").write_text(json.dumps(Calibration(**fields).to_json()))
    monkeypatch.setattr(study, "_replay", lambda *args: None)
    monkeypatch.setattr(study, "rq1_settings", lambda calibration, drafters: [])
    client = Recorder()
    options = CalibrationOptions(prompts_per_task=1, progress=False)
    config = study.StudyConfig(out_dir=tmp_path, progress=False, calibration=options)
    runs = study.run_study_replays(client, config, tiny_world)  # type: ignore[arg-type]
    return client, runs.calibration


def test_a_study_that_reuses_a_calibration_warms_the_sidecar_up_first(
    tiny_world: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replays rely on the calibration having warmed the sidecar up; a study reusing a saved
    calibration measured its first request (plain decoding) on a cold sidecar."""
    client, calibration = _study_with_saved_calibration(tiny_world, tmp_path, monkeypatch)
    assert calibration.method == "saved"  # reused
    assert client.pins[:2] == [ArmPin("none", 0), ArmPin("generic", 4)]


@pytest.mark.parametrize(
    ("saved", "said"),
    [
        ({"world": "/elsewhere/world"}, "measured on the world /elsewhere/world"),
        ({"world": None}, "(not recorded)"),
        ({"acceptance": {"generic": {}, "gone": {}}}, "measured the drafters ['generic', 'gone']"),
        ({"prompts_per_task": 3}, "3 prompts a task at k=4"),
    ],
)
def test_a_study_calibrates_anew_over_a_calibration_of_another_world_or_drafters(
    tiny_world: Any,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    saved: dict[str, Any],
    said: str,
) -> None:
    """Any calibration.json in the study's folder was reused: measured on another world,
    of other drafters or prompts, its oracle and static tables stood for this one's."""
    with caplog.at_level("WARNING", logger="benchmarks.replay.study"):
        _, calibration = _study_with_saved_calibration(tiny_world, tmp_path, monkeypatch, **saved)
    assert calibration.method != "saved"  # measured anew
    assert calibration.world == str(tiny_world.root)
    assert said in caplog.text and "calibrating anew" in caplog.text
