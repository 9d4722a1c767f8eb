"""chat: the next turn of a real human-human conversation (chitchat-dataset, MIT).

High entropy by nature: the reference is what a person actually said next, so a model's
token F1 against it stays low however good the model is. Replies are the longer turns of
the conversations (multi-sentence, 22-80 words), so answers have realistic length.
"""

from __future__ import annotations

import random
from functools import cache

from benchmarks.world import sources
from benchmarks.world.tasks.common import Pair, clean_partition, clip_words, template_set, turns

CHAT_SYSTEM_TRAIN: tuple[str | None, ...] = (
    None,
    None,
    "You are a friendly conversational partner.",
    "You are a helpful assistant.",
    "Chat with the user like a friend would.",
    "Keep the conversation going in a warm, casual tone.",
    "You are chatting with someone you just met online.",
    "Be talkative and curious.",
)
CHAT_SYSTEM_TEST: tuple[str | None, ...] = (
    None,
    "Chat casually with the user.",
    "You are a relaxed, easy-going companion.",
)
REPLY_WORDS = (22, 80)  # a reply turn's length in words (the longer, multi-sentence turns)
HISTORY_WORDS = 40  # each earlier turn is clipped to this many words


@cache
def conversation_pools() -> dict[str, list[tuple[str, ...]]]:
    """Conversations split by conversation (never a test conversation in training)."""
    return clean_partition(sources.chitchat_conversations(), 11, lambda c: [" ".join(c)])


def _reply_positions(conversation: tuple[str, ...]) -> list[int]:
    """Odd positions (the assistant's, so the history starts with the user) of long turns."""
    low, high = REPLY_WORDS
    return [
        i for i in range(1, len(conversation), 2) if low <= len(conversation[i].split()) <= high
    ]


def generate_chat(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Next turn of a real conversation after the previous one or three turns."""
    conversations = [c for c in conversation_pools()[split] if _reply_positions(c)]
    systems = template_set(split, CHAT_SYSTEM_TRAIN, CHAT_SYSTEM_TEST)
    pairs: list[Pair] = []
    while len(pairs) < count:
        conversation = rng.choice(conversations)
        end = rng.choice(_reply_positions(conversation))
        start = max(0, end - rng.choice((1, 1, 3)))
        history = [clip_words(t, HISTORY_WORDS) for t in conversation[start:end]]
        pairs.append((turns(rng.choice(systems), *history), conversation[end]))
    return pairs
