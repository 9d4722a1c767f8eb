"""vLLM's /tokenize and /detokenize on the sidecar's HTTP port, against what it serves."""

from __future__ import annotations

from typing import Any

from router.domain import Prompt
from tests.router.conftest import COMPLETION_PROMPT, SidecarThread
from tests.router.test_openai_front import client, post

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 17 * 23?"},
]


def test_tokenize_counts_what_generation_reads(sidecar: SidecarThread) -> None:
    """A text's tokens are the engine's, a chat's the template's rendering: the same
    counts the OpenAI front's usage reports for them; ``return_token_strs`` adds the
    tokens' strings, and ``max_model_len`` is the target's context."""
    service = sidecar.service
    status, text = post(
        f"{sidecar.http_url}/tokenize",
        {"model": "target", "prompt": COMPLETION_PROMPT, "return_token_strs": True},
    )
    assert status == 200, text
    ids = service.prompt_ids(Prompt(text=COMPLETION_PROMPT))
    assert text["tokens"] == ids and text["count"] == len(ids)
    assert text["token_strs"] == service.tokenizer.convert_ids_to_tokens(ids)
    assert text["max_model_len"] == service.context_tokens
    completion = client(sidecar).completions.create(
        model="target", prompt=COMPLETION_PROMPT, max_tokens=1
    )
    assert completion.usage is not None and completion.usage.prompt_tokens == text["count"]

    status, chat = post(f"{sidecar.http_url}/tokenize", {"messages": MESSAGES})
    assert status == 200 and chat["token_strs"] is None, chat
    answered = client(sidecar).chat.completions.create(
        model="target",
        messages=MESSAGES,
        max_tokens=1,  # type: ignore[arg-type]
    )
    assert answered.usage is not None and answered.usage.prompt_tokens == chat["count"]
    status, open_ended = post(
        f"{sidecar.http_url}/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}
    )
    assert status == 200 and chat["tokens"][: open_ended["count"]] == open_ended["tokens"]
    assert open_ended["count"] < chat["count"]


def test_detokenize_reads_ids_back_with_their_special_tokens(sidecar: SidecarThread) -> None:
    status, chat = post(f"{sidecar.http_url}/tokenize", {"messages": MESSAGES})
    assert status == 200, chat
    status, text = post(f"{sidecar.http_url}/detokenize", {"tokens": chat["tokens"]})
    assert status == 200, text
    assert text["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    status, round_trip = post(
        f"{sidecar.http_url}/tokenize", {"prompt": text["prompt"], "add_special_tokens": False}
    )
    assert status == 200 and round_trip["tokens"] == chat["tokens"]


def test_bad_tokenize_bodies_are_openai_errors(sidecar: SidecarThread) -> None:
    vocabulary = len(sidecar.service.tokenizer)
    for route, body, code, param in [
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": "   "}, 400, None),
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, 404, None),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True},
            400,
            "continue_final_message",
        ),
        ("/detokenize", {"tokens": [1, vocabulary]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
    ]:
        status, reply = post(f"{sidecar.http_url}{route}", body)
        assert status == code, (route, body, reply)
        assert reply["error"]["message"], reply
        if param is not None:
            assert reply["error"]["param"] == param, (body, reply)
    assert post(f"{sidecar.http_url}/tokenize", {"prompt": "still serving"})[0] == 200
