"""Reading prompts: each one's token count and its classification, behind one interface.

Route (a batch of calls formed by :mod:`router.coalescer`) and the load benchmark's floor
servicer ask a :class:`PromptReader` for the number of tokens of each prompt's model text
(the text the target reads) and the :class:`Classification` of each classifier text;
Generate (one call) asks it for the classification only, since it tokenizes its prompt
for the engine anyway. There are two implementations, chosen once at start by
``limits.prompt_reader``:

- ``"child_process"`` (the default): :class:`router.route_process.ChildProcessReader`,
  the work in a child process with its own GIL. A Python gRPC server spends most of its
  time holding the GIL in grpc.aio's call handling; the tokenizer and the classifier
  compete for that lock when they run in the sidecar's process. Side by side on 2 vCPUs
  (benchmarks/load/HISTORY.md, 2026-12-02) the child kept Route at concurrency 64 at
  0.60 of an echo servicer against 0.25 in-process (0.43 against 0.36 on a loaded
  machine); but a lone call (concurrency 1) took 1.45 ms against 1.23 ms in-process
  (1.34 against 1.15 loaded): the cost of waking the child.
  For hosts where waking an idle vCPU is that slow, ``limits.prompt_reader_spin_ms``
  (off by default) has the child busy-wait after a lone batch (:mod:`router.route_process`).
- ``"in_process"``: :class:`InProcessReader`, the work in the call, on the event loop:
  no process to start or watch, the lower latency at light load (and the child-process
  reader's fallback).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from classifiers.api import Classification
    from classifiers.holder import ClassifierHolder


@dataclass(frozen=True)
class PromptsRead:
    """The token counts of a batch's model texts and the classifications of its
    classifier texts, each in the order given."""

    token_counts: list[int]
    classifications: list[Classification]


class PromptReader(Protocol):
    """Counts prompts' tokens and classifies them (module doc)."""

    def start(self) -> None:
        """Start what the reader needs (a child process: in the background; until it is
        up, prompts are read in-process)."""
        ...

    async def read(
        self, model_texts: Sequence[str], classifier_texts: Sequence[str]
    ) -> PromptsRead:
        """The token count of each of ``model_texts`` (special tokens not added) and the
        current classifier's classification of each of ``classifier_texts``."""
        ...

    def close(self) -> None:
        """Release what the reader holds (a child process); reading after is an error."""
        ...


class InProcessReader:
    """:class:`PromptReader` in the caller's thread: the target's tokenizer (a
    transformers tokenizer, fast or not) and the classifier its holder serves now."""

    def __init__(self, tokenizer: Any, classifiers: ClassifierHolder) -> None:
        self._tokenizer = tokenizer
        self._fast_tokenizer = getattr(tokenizer, "backend_tokenizer", None)
        self._classifiers = classifiers

    async def read(
        self, model_texts: Sequence[str], classifier_texts: Sequence[str]
    ) -> PromptsRead:
        return self.read_now(model_texts, classifier_texts)

    def start(self) -> None:
        """Nothing to start."""

    def read_now(self, model_texts: Sequence[str], classifier_texts: Sequence[str]) -> PromptsRead:
        """:meth:`read`, synchronously."""
        classifications = (
            self._classifiers.current.classify_batch(list(classifier_texts))
            if classifier_texts
            else []
        )
        return PromptsRead(self._token_counts(model_texts), classifications)

    def _token_counts(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        if self._fast_tokenizer is not None:
            # Counts only: the _fast variant skips the character offsets, and len() of an
            # encoding builds no list of ids.
            encoded = self._fast_tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
            return [len(encoding) for encoding in encoded]
        ids = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(row) for row in ids]

    def close(self) -> None:
        """Nothing to release."""
