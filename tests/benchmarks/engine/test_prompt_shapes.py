"""The prompt-shape memory benchmark: a dtype measured in a child process, then tabled."""

from __future__ import annotations

import pytest

from benchmarks.engine import prompt_shapes


def test_a_dtype_is_measured_in_a_child_and_tabled() -> None:
    measured = prompt_shapes.in_child("bf16", prompt_shapes.REPEATED, 1, 1024)
    assert measured["dtype"] == "bf16" and measured["seconds"] > 0
    assert measured["start_mb"] > 0 and measured["after_distinct_mb"] > 0
    reference = {**measured, "dtype": "fp32"}
    table = prompt_shapes.format_results([reference, measured], prompt_shapes.REPEATED, 1)
    rows = table.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["fp32", "bf16"]
    assert rows[1].split()[4] == f"{measured['mb_per_length']:.2f}"


def test_fewer_lengths_than_the_repeat_is_refused() -> None:
    with pytest.raises(SystemExit):
        prompt_shapes.main(["--lengths", "5"])
