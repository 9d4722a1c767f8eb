"""Streaming detokenization and text stop sequences over a growing list of token ids."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids that decoding with ``skip_special_tokens`` leaves out: the tokenizer's special
    tokens and the added tokens marked special (Qwen2.5's ``<|im_end|>`` and the like)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


class IncrementalDetokenizer:
    """Each appended token's newly completed text (TGI's prefix/read offsets).

    The texts of the tokens pushed, plus :meth:`flush`, concatenate to the decoded output.
    Text is released only when it no longer ends in an incomplete UTF-8 sequence, and only
    a short window of ids is re-decoded per token. Special tokens decode to nothing (their
    text is never emitted) unless ``skip_special_tokens`` is off (vLLM's parameter);
    :meth:`is_special` says which they are.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        # The Rust tokenizer decodes several times faster than the Python wrapper.
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._special_ids = special_token_ids(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        skip = self.skip_special_tokens
        if self._backend is not None:
            return str(self._backend.decode(list(ids), skip_special_tokens=skip))
        return str(self._tokenizer.decode(ids, skip_special_tokens=skip))

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def push(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        released = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += released
        return released

    def flush(self) -> str:
        """Release whatever text is pending (at the end of a generation)."""
        new_text = self._decode(self._ids[self._prefix_offset :])
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        released = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self.text += released
        return released


def find_stop(text: str, stop_sequences: Sequence[str], searched_up_to: int) -> int | None:
    """End offset of the earliest stop sequence in ``text`` that ends after
    ``searched_up_to`` (text before it was already checked), or None."""
    best: int | None = None
    for stop in stop_sequences:
        if not stop:
            continue
        found = text.find(stop, max(0, searched_up_to - len(stop) + 1))
        if found >= 0 and (best is None or found + len(stop) < best):
            best = found + len(stop)
    return best


def push_until_stop(
    detokenizer: IncrementalDetokenizer,
    tokens: Sequence[int],
    stop_token_ids: Collection[int],
    stop_sequences: Sequence[str],
    unchecked: int = 0,
) -> tuple[list[str], str | None]:
    """Push ``tokens`` to ``detokenizer`` up to the first stop token or the token that
    completes a stop sequence: each pushed token's text (that last one's ending at the stop
    sequence's end) and why it stopped ("eos_token", "stop_sequence"; None: it did not).
    Tokens after the stop are not pushed: as many texts as tokens kept. The first
    ``unchecked`` tokens stop nothing (``min_tokens``, as vLLM reads it). A special stop
    token adds no text even where the detokenizer keeps special tokens (vLLM leaves the
    token that ended the generation out of its text)."""
    texts: list[str] = []
    for index, token in enumerate(tokens):
        stops = index >= unchecked and token in stop_token_ids
        if stops and detokenizer.is_special(token):  # not pushed: it adds no text
            return [*texts, ""], "eos_token"
        checked = len(detokenizer.text)
        released = detokenizer.push(token)
        if index < unchecked:
            texts.append(released)
            continue
        if stops:
            return [*texts, released], "eos_token"
        if stop_sequences:
            end = find_stop(detokenizer.text, stop_sequences, checked)
            if end is not None:  # characters of this release up to the stop's end
                return [*texts, released[: end - checked]], "stop_sequence"
        texts.append(released)
    return texts, None
