"""summarization, qa and rag over real government help pages (doc2dial via nvidia-lm-eval, MIT).

The passages are real; the requests and the extractive references are generated:
- summarization: a section (3+ sentences) -> its lead sentences (one, two, or as bullets);
- qa: a section and a question about a phrase of one of its sentences -> that sentence;
  plus closed-book questions about languages (Django's ``LANG_INFO``) in training only;
- rag: two or three retrieved sections -> the asked one's text, with its citation.
Documents (doc2dial passages) are partitioned between splits, so a test section, and every
12-word run of it, is absent from the training text: the target must copy from the prompt,
not recall.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from functools import cache

from benchmarks.world import sources
from benchmarks.world.tasks.common import (
    Pair,
    clean_partition,
    template_set,
    turns,
    words,
)

PASSAGE_WORDS = 100  # a summarized or questioned section is clipped to about this many words
RETRIEVED_WORDS = 36  # each retrieved passage of a rag prompt holds at most this many words


@cache
def section_pools() -> dict[str, list[sources.Section]]:
    """Sections split by source document (a doc2dial passage): no document spans splits."""
    by_document: dict[str, list[sources.Section]] = defaultdict(list)
    for section in sources.document_sections():
        by_document[section.document].append(section)
    documents = [tuple(by_document[d]) for d in sorted(by_document)]
    # Titles count as text: one passage's heading can be another's first words.
    pools = clean_partition(
        documents, 12, lambda doc: [" ".join(" ".join((s.title, *s.sentences)) for s in doc)]
    )
    return {split: [s for doc in docs for s in doc] for split, docs in pools.items()}


def lead_sentences(sentences: tuple[str, ...], limit: int) -> list[str]:
    """The first sentences whose words fit in ``limit`` (at least the first one)."""
    chosen: list[str] = []
    total = 0
    for sentence in sentences:
        size = len(sentence.split())
        if chosen and total + size > limit:
            break
        chosen.append(sentence)
        total += size
    return chosen


# --- summarization ------------------------------------------------------------------------

SUMMARY_TRAIN: dict[str, tuple[str, ...]] = {
    "one": (
        "Summarize the following text in one sentence.\n\n{text}",
        "Give a one-sentence summary of this passage:\n{text}",
        "In one sentence, what does this section say?\n{text}",
        "Write a one-line summary of the text below.\n\n{text}",
        "{text}\n\nSum up the text above in a single sentence.",
        "What is the main point of this text? One sentence, please.\n{text}",
    ),
    "brief": (
        "Summarize this:\n{text}",
        "Can you summarize the following text?\n\n{text}",
        "TL;DR:\n{text}",
        "Write a short summary of this passage.\n\n{text}",
        "Give me a brief summary of the section below.\n{text}",
        "Summarize the following in two sentences.\n\n{text}",
        "{text}\n\nSummarize the passage above.",
        "Please condense this text into a couple of sentences:\n{text}",
        "What's the gist of this?\n{text}",
        "Shorten this text for a newsletter:\n\n{text}",
        "I don't have time to read all of this. Summarize it for me:\n{text}",
        "Write an abstract of the following help page.\n{text}",
        "Give a short overview of this text:\n{text}",
        "Briefly, what is this text about?\n\n{text}",
        "Produce a concise summary.\n\n{text}",
        "tl;dr please\n{text}",
    ),
    "bullets": (
        "List the key points of this text as bullets.\n{text}",
        "Summarize the following as bullet points:\n\n{text}",
        "What are the main points here? Use a bulleted list.\n{text}",
        "{text}\n\nGive me the key takeaways as bullet points.",
        "Bullet-point summary, please:\n{text}",
        "Extract the main points of the passage below as a list.\n\n{text}",
    ),
}
SUMMARY_TEST: dict[str, tuple[str, ...]] = {
    "one": ("Boil this text down to a single sentence.\n{text}",),
    "brief": (
        "Could you give me a quick summary of this?\n\n{text}",
        "Summarise the text below for a busy reader.\n{text}",
    ),
    "bullets": ("Note down the essential points of this text as a list.\n{text}",),
}
SUMMARY_KINDS = ("one", "brief", "brief", "brief", "brief", "bullets", "bullets", "bullets")
SUMMARY_WORDS = 60  # the lead sentences a brief summary keeps (at least two)


def summary_of(sentences: tuple[str, ...], kind: str) -> str:
    """The extractive reference: the lead sentence, lead sentences, or them as bullets."""
    if kind == "one":
        return sentences[0]
    lead = lead_sentences(sentences[:3], SUMMARY_WORDS)
    lead = lead if len(lead) >= 2 else list(sentences[:2])
    if kind == "bullets":
        return "\n".join(f"- {s}" for s in lead)
    return " ".join(lead)


def generate_summarization(rng: random.Random, split: str, count: int) -> list[Pair]:
    """A help section (with or without its title); the reference is its lead (extractive)."""
    sections = [s for s in section_pools()[split] if len(s.sentences) >= 3]
    templates = SUMMARY_TEST if split == "test" else SUMMARY_TRAIN
    pairs: list[Pair] = []
    for _ in range(count):
        section = rng.choice(sections)
        body = lead_sentences(section.sentences, PASSAGE_WORDS)
        if len(body) < 3:
            body = list(section.sentences[:3])
        kind = rng.choice(SUMMARY_KINDS)
        text = " ".join(body)
        if rng.random() < 0.6:
            text = f"{section.title}\n{text}"
        prompt = rng.choice(templates[kind]).format(text=text)
        pairs.append((turns(None, prompt), summary_of(tuple(body), kind)))
    return pairs


# --- qa: reading comprehension over a passage; closed-book questions in training only ----

QA_PASSAGE_TRAIN = (
    "{passage}\n\nWhat does the passage say about {phrase}?",
    "Read the text and answer: what is said about {phrase}?\n\n{passage}",
    "Based on the passage below, what do we learn about {phrase}?\n{passage}",
    "{passage}\n\nQuestion: What does the text say about {phrase}?",
    "According to this text, what is true about {phrase}?\n{passage}",
    "Passage:\n{passage}\n\nQuestion: what is mentioned about {phrase}?",
    "Answer from the text. What does it say regarding {phrase}?\n\n{passage}",
    "{passage}\n\nAccording to the passage, what about {phrase}?",
    "Here is a paragraph:\n{passage}\nWhich sentence talks about {phrase}?",
    "Context: {passage}\nQ: What does the context say about {phrase}?",
    "I read this:\n{passage}\nWhat does it tell me about {phrase}?",
    "{passage}\n\nFrom the text above, answer: what is stated about {phrase}?",
)
QA_PASSAGE_TEST = (
    "Using the paragraph below, tell me what it says about {phrase}.\n\n{passage}",
    "{passage}\n\nWhat information does this text give about {phrase}?",
)
QA_CLOSED_BOOK: dict[str, tuple[str, ...]] = {
    "code": (
        "What is the language code for {name}?",
        "Which code is used for the {name} language?",
        "What's the ISO code of {name}?",
        "How is {name} written as a language code?",
        "Tell me the locale code for {name}.",
    ),
    "name": (
        "Which language has the code {code}?",
        "What language is {code}?",
        "The code {code} stands for which language?",
        "Which language does the locale {code} refer to?",
    ),
    "local": (
        "What do speakers of {name} call their language?",
        "What is {name} called in {name}?",
        "What is the native name of the {name} language?",
        "How do {name} speakers write the name of their language?",
    ),
}
QA_ANSWERS = {
    "code": "The language code for {name} is {code}.",
    "name": "{code} is the code for {name}.",
    "local": "Speakers of {name} call it {local}.",
}
CLOSED_BOOK_SHARE = 0.25  # of qa training and validation prompts; the test split is passages
_PLAIN_WORD = re.compile(r"[A-Za-z][a-z]*")
_STOPWORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "of",
        "to",
        "in",
        "on",
        "for",
        "and",
        "or",
        "but",
        "is",
        "are",
        "be",
        "by",
        "with",
        "at",
        "as",
        "it",
        "its",
        "this",
        "that",
        "you",
        "your",
        "if",
        "from",
        "not",
        "can",
        "may",
        "will",
        "has",
        "have",
        "was",
        "were",
        "do",
        "does",
    }
)


def key_phrases(sentence: str, others: str) -> list[str]:
    """Runs of 2-3 plain words of ``sentence`` with no stopword (but a middle "of"), no
    punctuation inside, and found nowhere else in the passage (``others``): a question
    about one has one answer."""
    raw = sentence.split()
    elsewhere = " ".join(words(others))
    phrases = []
    for size in (2, 3):
        for i in range(len(raw) - size + 1):
            run = raw[i : i + size]
            if any(not _PLAIN_WORD.fullmatch(w) for w in run[:-1]):
                continue  # punctuation inside the run: it would cross a phrase boundary
            run[-1] = run[-1].rstrip(".,;:!?")
            inner = run[1:-1]
            if not _PLAIN_WORD.fullmatch(run[-1]):
                continue
            if run[0].lower() in _STOPWORDS or run[-1].lower() in _STOPWORDS:
                continue
            if any(w.lower() in _STOPWORDS and w != "of" for w in inner):
                continue
            phrase = " ".join(run)
            if len(phrase) >= 8 and phrase.lower() not in elsewhere:
                phrases.append(phrase)
    return phrases


def qa_answer(response: str) -> str:
    """The short answer inside a closed-book reference (its template's slot), else the text."""
    for relation, template in QA_ANSWERS.items():
        pattern = re.escape(template)
        for slot in ("name", "code", "local"):
            pattern = pattern.replace(rf"\{{{slot}\}}", f"(?P<{slot}>.+?)")
        match = re.fullmatch(pattern, response.strip())
        if match:
            return match.group(relation)
    return response.strip()


WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
SEPARATOR_NAMES = {",": "a comma", ".": "a full stop", "\u00a0": "a space", " ": "a space"}
QA_CONVENTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "week": (
        (
            "On which day does the week start in {name}?",
            "Which day is the first day of the week for {name} speakers?",
            "When does the calendar week begin in {name}?",
        ),
        "In {name}, the week starts on {day}.",
    ),
    "decimal": (
        (
            "What is the decimal separator in {name}?",
            "Which character separates decimals in {name} numbers?",
            "How are decimals written in {name}: with a comma or a point?",
        ),
        "{name} writes decimals with {separator}.",
    ),
    "bidi": (
        (
            "Is {name} written from right to left?",
            "Which direction is {name} written in?",
            "Does {name} read left to right?",
        ),
        "{name} is written from {direction}.",
    ),
}


def _closed_book(rng: random.Random) -> Pair:
    """A closed-book question about a language: its code, native name, script direction or
    (where Django records them) its week start and decimal separator."""
    languages = {language.code: language for language in sources.django_languages()}
    relation = rng.choice(sorted(QA_CLOSED_BOOK) + sorted(QA_CONVENTIONS))
    if relation in QA_CONVENTIONS:
        questions, answer = QA_CONVENTIONS[relation]
        formats = [
            f
            for f in sources.django_locale_formats()
            if f.code in languages
            and f.first_day_of_week is not None
            and f.decimal_separator in SEPARATOR_NAMES
        ]
        locale = rng.choice(formats)
        language = languages[locale.code]
        day = WEEKDAYS[locale.first_day_of_week or 0]
        separator = SEPARATOR_NAMES[locale.decimal_separator or "."]
        direction = "right to left" if language.bidi else "left to right"
        fields = {
            "name": language.name,
            "day": day,
            "separator": separator,
            "direction": direction,
        }
        return turns(None, rng.choice(questions).format(**fields)), answer.format(**fields)
    language = rng.choice(sorted(languages.values(), key=lambda item: item.code))
    fields = {"name": language.name, "code": language.code, "local": language.name_local}
    prompt = rng.choice(QA_CLOSED_BOOK[relation]).format(**fields)
    return turns(None, prompt), QA_ANSWERS[relation].format(**fields)


def _passage_question(
    rng: random.Random, section: sources.Section, templates: tuple[str, ...]
) -> Pair | None:
    body = lead_sentences(section.sentences, PASSAGE_WORDS)
    candidates = list(range(1, len(body))) if len(body) > 1 and rng.random() < 0.7 else [0]
    index = rng.choice(candidates)
    others = " ".join([section.title] + [s for i, s in enumerate(body) if i != index])
    phrases = key_phrases(body[index], others)
    if not phrases:
        return None
    passage = " ".join(body)
    prompt = rng.choice(templates).format(passage=passage, phrase=rng.choice(phrases))
    return turns(None, prompt), body[index]


def generate_qa(rng: random.Random, split: str, count: int) -> list[Pair]:
    """A question about a phrase of a real passage (answer: the sentence that says it), or,
    in training, a closed-book question about a language."""
    sections = section_pools()[split]
    templates = tuple(template_set(split, QA_PASSAGE_TRAIN, QA_PASSAGE_TEST))
    pairs: list[Pair] = []
    while len(pairs) < count:
        if split != "test" and rng.random() < CLOSED_BOOK_SHARE:
            pairs.append(_closed_book(rng))
            continue
        pair = _passage_question(rng, rng.choice(sections), templates)
        if pair is not None:
            pairs.append(pair)
    return pairs


# --- rag: retrieved passages + a question about one of them -------------------------------

RAG_SYSTEM_TRAIN: tuple[str | None, ...] = (
    "Answer the question using only the retrieved passages.",
    "You are a support assistant. Answer from the documents provided and cite them.",
    "Use the search results to answer. Quote the relevant passage.",
    "Answer based on the context below. Cite the passage number.",
    None,
)
RAG_SYSTEM_TEST: tuple[str | None, ...] = (
    "Rely only on the supplied documents when you answer, and cite your source.",
    None,
)
# How the retrieved passages are laid out: (header line, one passage given n/title/text).
RAG_LAYOUTS_TRAIN: tuple[tuple[str, str], ...] = (
    ("Retrieved passages:", "[{n}] {title}: {text}"),
    ("Context:", "Document {n} ({title}): {text}"),
    ("Search results:", "({n}) {title} - {text}"),
    ("Documents:", "[{n}] {title}\n{text}"),
)
RAG_LAYOUTS_TEST: tuple[tuple[str, str], ...] = (
    ("Knowledge base excerpts:", "#{n} {title}: {text}"),
)
RAG_QUESTIONS_TRAIN = (
    "Question: What do the documents say about {topic}?",
    "Question: {topic} - what applies?",
    "According to the passages, what should I know about {topic}?",
    "Using the context above, explain {topic}.",
    "What information do the search results give on {topic}?",
    "Based on these documents, what is said about {topic}?",
    "Answer from the passages: what about {topic}?",
    "Q: what does the context say regarding {topic}?",
)
RAG_QUESTIONS_TEST = (
    "With reference to the excerpts, what can you tell me about {topic}?",
    "From the retrieved text only: what is the situation with {topic}?",
)


def _retrieved_text(section: sources.Section) -> str:
    return " ".join(lead_sentences(section.sentences, RETRIEVED_WORDS))


def generate_rag(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Two or three retrieved sections of one domain and a question about one of them (by
    its title or by a phrase of its text); the answer cites it and quotes its text."""
    by_domain: dict[str, list[sources.Section]] = defaultdict(list)
    for section in section_pools()[split]:
        by_domain[section.domain].append(section)
    domains = sorted(d for d, s in by_domain.items() if len(s) >= 3)
    systems = template_set(split, RAG_SYSTEM_TRAIN, RAG_SYSTEM_TEST)
    layouts = template_set(split, RAG_LAYOUTS_TRAIN, RAG_LAYOUTS_TEST)
    questions = template_set(split, RAG_QUESTIONS_TRAIN, RAG_QUESTIONS_TEST)
    pairs: list[Pair] = []
    while len(pairs) < count:
        retrieved = rng.sample(by_domain[rng.choice(domains)], rng.choice((2, 2, 3)))
        titles = {s.title.lower() for s in retrieved}
        if len(titles) < len(retrieved):
            continue
        n = rng.randrange(len(retrieved))
        asked = retrieved[n]
        text = _retrieved_text(asked)
        topic = asked.title
        if rng.random() < 0.3:
            others = " ".join(_retrieved_text(s) + " " + s.title for s in retrieved if s != asked)
            phrases = key_phrases(text, others + " " + asked.title)
            if phrases:
                topic = rng.choice(phrases)
        header, line = rng.choice(layouts)
        context = "\n".join(
            line.format(n=i, title=s.title, text=_retrieved_text(s))
            for i, s in enumerate(retrieved, 1)
        )
        prompt = f"{header}\n{context}\n\n{rng.choice(questions).format(topic=topic)}"
        answer = f'According to [{n + 1}] "{asked.title}": {text}'
        pairs.append((turns(rng.choice(systems), prompt), answer))
    return pairs
