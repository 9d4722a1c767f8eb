"""``specroute generate`` and ``route`` against a real sidecar: a plain argument is a user
message (the sidecar applies the chat template), ``--raw`` sends the text as is, and no
special token's text is ever printed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from classifiers.chat import IM_END, IM_START
from router.cli import build_app
from router.domain import Prompt
from router.pb import router_pb2 as pb
from tests.router.conftest import COMPLETION_PROMPT, SidecarThread, greedy_reference

QUESTION = "What is 17 * 23?"
DECISION_LINE = re.compile(r"^\[.* k=\d+, (\d+) prompt tokens\]$", re.MULTILINE)


def _invoke(sidecar: SidecarThread, *args: str) -> Result:
    result = CliRunner().invoke(build_app(), [*args, "--address", sidecar.running.address])
    assert result.exit_code == 0, result.output
    return result


def _prompt_tokens(sidecar: SidecarThread, prompt: Prompt) -> int:
    """What the sidecar counts for ``prompt`` (a conversation: after its chat template)."""
    return len(sidecar.service.prompt_ids(prompt))


def _as_user_message(text: str) -> Prompt:
    return Prompt(messages=({"role": "user", "content": text},))


@pytest.fixture(scope="module")
def counts(sidecar: SidecarThread) -> dict[str, int]:
    chat = _prompt_tokens(sidecar, _as_user_message(QUESTION))
    raw = _prompt_tokens(sidecar, Prompt(text=QUESTION))
    assert chat > raw  # the template's markers and roles: the two are told apart
    return {"chat": chat, "raw": raw}


def _user_turn(text: str) -> pb.Conversation:
    return pb.Conversation(messages=[pb.ChatMessage(role="user", content=text)])


def test_generate_sends_a_plain_argument_as_a_user_message(
    sidecar: SidecarThread, counts: dict[str, int]
) -> None:
    result = _invoke(sidecar, "generate", QUESTION, "--max-new-tokens", "8", "--drafter", "none")
    decision = DECISION_LINE.search(result.stderr)
    assert decision is not None, result.stderr
    assert int(decision.group(1)) == counts["chat"]
    # The printed text is the reply to that conversation, and nothing else.
    request = pb.GenerateRequest(
        conversation=_user_turn(QUESTION), max_new_tokens=8, force_drafter="none", no_update=True
    )
    chunks = list(sidecar.stub.Generate(request, timeout=120))
    assert result.stdout == chunks[-1].stats.generated_text + "\n"


# Near-uniform sampling, so that some seed ends the reply with the end-of-turn token (the
# barely trained tiny target never does greedily: it emits whitespace after a template).
HOT = 1000.0


def _seed_that_ends_the_turn(sidecar: SidecarThread, max_new_tokens: int) -> int:
    for seed in range(40):
        request = pb.GenerateRequest(
            conversation=_user_turn(QUESTION),
            max_new_tokens=max_new_tokens,
            sampling=pb.SamplingParams(do_sample=True, temperature=HOT, seed=seed),
            force_drafter="none",
            no_update=True,
        )
        chunks = list(sidecar.stub.Generate(request, timeout=120))
        last = [token for chunk in chunks for token in chunk.tokens][-1]
        if chunks[-1].stats.finish_reason == "eos_token" and last.special:
            return seed
    raise AssertionError("no seed in 0..39 ends the reply with a special token")


def test_generate_never_prints_a_special_token(sidecar: SidecarThread) -> None:
    max_new_tokens = 200
    seed = _seed_that_ends_the_turn(sidecar, max_new_tokens)
    result = _invoke(
        sidecar,
        *("generate", QUESTION, "--sample", "--temperature", str(HOT), "--seed", str(seed)),
        *("--max-new-tokens", str(max_new_tokens), "--drafter", "none"),
    )
    assert "eos_token]" in result.stderr
    assert IM_END not in result.stdout and IM_START not in result.stdout


# The completion prompt as is, 6 greedy tokens without speculation.
RAW_GREEDY_6 = (
    "generate",
    COMPLETION_PROMPT,
    "--raw",
    "--max-new-tokens",
    "6",
    "--drafter",
    "none",
)


def test_generate_raw_sends_the_text_as_is(sidecar: SidecarThread) -> None:
    expected_ids, expected_text = greedy_reference(sidecar, COMPLETION_PROMPT, 6)
    assert len(expected_ids) == 6  # a visible completion, not a lone end of turn
    result = _invoke(sidecar, *RAW_GREEDY_6)
    decision = DECISION_LINE.search(result.stderr)
    assert decision is not None, result.stderr
    assert int(decision.group(1)) == _prompt_tokens(sidecar, Prompt(text=COMPLETION_PROMPT))
    assert result.stdout == expected_text + "\n"
    assert "6 tokens" in result.stderr


def test_route_sends_a_plain_argument_as_a_user_message_and_raw_text_as_is(
    sidecar: SidecarThread, counts: dict[str, int]
) -> None:
    chat = json.loads(_invoke(sidecar, "route", QUESTION).stdout)
    raw = json.loads(_invoke(sidecar, "route", QUESTION, "--raw").stdout)
    assert chat["prompt_tokens"] == counts["chat"]
    assert raw["prompt_tokens"] == counts["raw"]


def test_generate_prints_each_tokens_logprob_when_asked(sidecar: SidecarThread) -> None:
    """``--logprobs N``: after the reply, one line a token on stderr, with the logprob the
    gRPC API returns and N alternatives."""
    result = _invoke(sidecar, *RAW_GREEDY_6, "--logprobs", "2")
    request = pb.GenerateRequest(
        text=COMPLETION_PROMPT,
        max_new_tokens=6,
        force_drafter="none",
        no_update=True,
        logprobs=2,
    )
    tokens = [t for c in sidecar.stub.Generate(request, timeout=120) for t in c.tokens]
    lines = [line.split("\t") for line in result.stderr.splitlines() if line.count("\t") == 3]
    assert [int(line[0]) for line in lines] == [t.id for t in tokens]
    assert [float(line[2]) for line in lines] == pytest.approx(
        [t.logprob for t in tokens], abs=1e-4
    )
    assert all(len(line[3].split(" ")) >= 2 for line in lines)
    plain = _invoke(sidecar, "generate", COMPLETION_PROMPT, "--raw", "--max-new-tokens", "3")
    assert not any(line.count("\t") == 3 for line in plain.stderr.splitlines())


def test_generate_drafts_from_a_prediction_file_and_says_how_much_it_kept(
    sidecar: SidecarThread, tmp_path: Path
) -> None:
    args = ("generate", QUESTION, "--max-new-tokens", "8", "--drafter", "none")
    plain = _invoke(sidecar, *args)
    answer = tmp_path / "answer.txt"
    answer.write_text(plain.stdout.rstrip("\n"), encoding="utf-8")
    drafted = ("generate", QUESTION, "--max-new-tokens", "8", "--drafter", "generic")
    predicted = _invoke(sidecar, *drafted, "--prediction", str(answer))
    assert predicted.stdout == plain.stdout
    assert re.search(r"\d+ predicted tokens accepted of \d+\]", predicted.stderr)
    assert "predicted" not in plain.stderr
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    result = CliRunner().invoke(
        build_app(), [*args, "--prediction", str(binary), "--address", sidecar.running.address]
    )
    assert result.exit_code == 2 and "cannot read" in result.stderr, result.output
