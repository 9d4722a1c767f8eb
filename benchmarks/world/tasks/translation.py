"""translation: real Django interface messages and their human translations (BSD-3).

Seven locales (de, es, fr, it, ja, nl, pt), mostly English into one of them and sometimes
back into English. A prompt holds two to four whole messages (sentences and phrases, one
per line; the reference is their translations, line for line), or, about one time in seven, one
message quoted inside the request. Messages are partitioned
between splits: a test message never occurs in training in any language.
"""

from __future__ import annotations

import random
from functools import cache

from benchmarks.world import sources
from benchmarks.world.tasks.common import Pair, clean_partition, template_set, turns

LANGUAGES: dict[str, str] = {
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "it": "Italian",
    "ja": "Japanese",
    "nl": "Dutch",
    "pt": "Portuguese",
}
INTO_ENGLISH_SHARE = 0.2  # prompts asking for English from another language (not Japanese)
MESSAGES_PER_PROMPT = (2, 3, 3, 4)

TRANSLATION_TRAIN = (
    "Translate into {target}:\n{text}",
    "Translate the following from {source} to {target}:\n{text}",
    "Please translate this into {target}.\n\n{text}",
    "Can you translate these lines to {target}?\n{text}",
    "How would I say this in {target}?\n{text}",
    "{source} to {target}:\n{text}",
    "I need a {target} version of the text below.\n{text}",
    "Render these messages in {target}, one per line:\n{text}",
    "What is this in {target}?\n{text}",
    "Give me the {target} translation of:\n{text}",
    "Our website is being localized into {target}. Translate these strings:\n{text}",
    "Translate to {target} and keep the line breaks:\n{text}",
    "{text}\n\nTranslate the lines above into {target}.",
    "Could you put this into {target} for me?\n{text}",
    "Help me translate this {source} text into {target}:\n{text}",
    "Translation into {target}, please:\n{text}",
    "Write these sentences in {target}.\n{text}",
    "How do you say the following in {target}?\n{text}",
    "Convert this text from {source} into {target}:\n{text}",
    "{target} translation needed:\n{text}",
    "Translate these error messages for our {target} users:\n{text}",
    "Say this in {target}, please.\n{text}",
    "What's the {target} for these?\n{text}",
    "I'm writing to a {target} speaker. How do I write this?\n{text}",
)
# One message quoted inside the request ("How do you say '...' in German?").
TRANSLATION_INLINE_TRAIN = (
    "How do you say '{text}' in {target}?",
    "What is '{text}' in {target}?",
    "Translate '{text}' into {target}.",
    "What does '{text}' mean in {target}?",
    'Can you translate "{text}" to {target}?',
    'In {target}, how would I write "{text}"?',
    "{target} for '{text}'?",
    'What\'s the {target} translation of "{text}"?',
)
TRANSLATION_INLINE_TEST = ("I'd like to say '{text}' in {target}. How?",)
INLINE_SHARE = 0.15  # prompts that quote a single message inside the request
TRANSLATION_TEST = (
    "Could you translate the text below into {target}?\n{text}",
    "Turn this into {target}:\n{text}",
    "Please give the {target} equivalent of these lines.\n{text}",
)


@cache
def message_pools() -> dict[str, list[sources.TranslatedString]]:
    """Django messages split by message: a test message is in no training prompt."""
    strings = sources.django_sentences(tuple(sorted(LANGUAGES)))
    return clean_partition(strings, 16, lambda s: [s.english] + [t for _, t in s.translations])


def generate_translation(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Two to four whole messages into (or from) one of seven languages, line for line."""
    messages = message_pools()[split]
    templates = template_set(split, TRANSLATION_TRAIN, TRANSLATION_TEST)
    pairs: list[Pair] = []
    for _ in range(count):
        inline = rng.random() < INLINE_SHARE
        size = 1 if inline else rng.choice(MESSAGES_PER_PROMPT)
        chosen = rng.sample(messages, min(size, len(messages)))
        locale = rng.choice(sorted(LANGUAGES))
        foreign = [m.into(locale) or m.english for m in chosen]
        english = [m.english for m in chosen]
        if locale != "ja" and rng.random() < INTO_ENGLISH_SHARE:
            source, target, text, reference = LANGUAGES[locale], "English", foreign, english
        else:
            source, target, text, reference = "English", LANGUAGES[locale], english, foreign
        wordings = (
            template_set(split, TRANSLATION_INLINE_TRAIN, TRANSLATION_INLINE_TEST)
            if inline
            else templates
        )
        prompt = rng.choice(wordings).format(source=source, target=target, text="\n".join(text))
        pairs.append((turns(None, prompt), "\n".join(reference)))
    return pairs
