"""The built-in world's multitask corpus: seven tasks as Qwen2.5 chat (messages, response) pairs.

Each task has its own generator (``TASK_GENERATORS``, a registry keyed by task name) that
turns real text (see ``sources``) or a seeded procedure into examples. Tasks differ the way
real ones do: copy-heavy (summarization, rag), deterministic mapping (translation, qa, math),
high entropy (chat), long structured output (code); and in prompt/response lengths.

Splits: ``train`` and ``validation`` use the training templates, ``test`` uses a disjoint set
of templates (held-out wording) and, where the task has independent items (conversations,
code problems, label lists), items never seen in training. QA is closed-book over a fact
base the target memorises in training, so its test split re-asks the same facts in words
never used in training; summarization and rag likewise ask about a fixed knowledge base of
help sections (``knowledge_base``) in held-out wording.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from benchmarks.world import sources
from classifiers.text import prompt_from_messages

TASKS: tuple[str, ...] = ("chat", "translation", "summarization", "qa", "math", "rag", "code")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One prompt (Qwen chat turns, the last one the user's) and its reference response."""

    id: str
    task: str
    split: str
    messages: tuple[dict[str, str], ...]
    response: str

    def to_json(self) -> str:
        """One JSON line."""
        return json.dumps(
            {
                "id": self.id,
                "task": self.task,
                "split": self.split,
                "messages": list(self.messages),
                "response": self.response,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Example:
        """Inverse of ``to_json`` (after ``json.loads``)."""
        return cls(
            id=str(row["id"]),
            task=str(row["task"]),
            split=str(row["split"]),
            messages=tuple({"role": m["role"], "content": m["content"]} for m in row["messages"]),
            response=str(row["response"]),
        )


@dataclass(frozen=True)
class Corpus:
    """Train, validation and test examples of every task."""

    seed: int
    scale: str
    train: list[Example] = field(default_factory=list)
    validation: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        """Examples of one split by name."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def by_task(self, split: str, task: str) -> list[Example]:
        """Examples of one task in one split."""
        return [e for e in self.split(split) if e.task == task]


@dataclass(frozen=True)
class SplitSizes:
    """Examples per task in each split."""

    train: int
    validation: int
    test: int


SCALES: dict[str, SplitSizes] = {
    "tiny": SplitSizes(train=48, validation=8, test=8),
    "default": SplitSizes(train=1400, validation=40, test=50),
}


def prompt_text(example: Example) -> str:
    """What a classifier sees: the system prompt (if any) and the last user turn."""
    return prompt_from_messages(example.messages)


# One generator per task: (rng, split, count) -> list of (messages, response).
Pair = tuple[tuple[dict[str, str], ...], str]
TaskGenerator = Callable[[random.Random, str, int], list[Pair]]


def _turns(system: str | None, *user_and_assistant: str) -> tuple[dict[str, str], ...]:
    """Chat turns alternating user/assistant, optionally after a system prompt."""
    roles = ("user", "assistant")
    turns = [{"role": roles[i % 2], "content": t} for i, t in enumerate(user_and_assistant)]
    head = [{"role": "system", "content": system}] if system else []
    return tuple(head + turns)


def _partition(items: Sequence[Any], split: str, rng: random.Random) -> list[Any]:
    """Disjoint item pools: ~80% train, ~5% validation, ~15% test (shuffled by ``rng``)."""
    order = list(items)
    rng.shuffle(order)
    n = len(order)
    cut_train, cut_validation = int(n * 0.80), int(n * 0.85)
    pools = {
        "train": order[:cut_train],
        "validation": order[cut_train:cut_validation],
        "test": order[cut_validation:],
    }
    return pools[split]


def _template_set(split: str, train: Sequence[T], test: Sequence[T]) -> Sequence[T]:
    """Test prompts use held-out wording; train and validation share the training wording."""
    return test if split == "test" else train


# --- chat: real human-human conversations (high entropy) --------------------------------

CHAT_SYSTEM_TRAIN: tuple[str | None, ...] = ("You are a friendly conversational partner.", None)
CHAT_SYSTEM_TEST: tuple[str | None, ...] = ("Chat casually with the user and keep replies short.",)


def generate_chat(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Next turn of a real chitchat conversation (history: the previous turn or three)."""
    conversations = _partition(sources.chitchat_conversations(), split, random.Random(11))
    systems = _template_set(split, CHAT_SYSTEM_TRAIN, CHAT_SYSTEM_TEST)
    pairs: list[Pair] = []
    while len(pairs) < count:
        turns = [_clip_words(t, 30) for t in rng.choice(conversations)]
        # The assistant speaks at odd positions so the history starts with the user.
        end = rng.choice(range(1, len(turns), 2))
        start = max(0, end - rng.choice((1, 3)))
        pairs.append((_turns(rng.choice(systems), *turns[start:end]), turns[end]))
    return pairs


def _clip_words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words[:limit])


# --- translation: real Django UI strings, English -> French (deterministic mapping) ------

TRANSLATION_TRAIN = (
    "Translate these interface labels into French: {labels}",
    "French translation of the following UI strings, keep the separators: {labels}",
    "Localize for a French admin site: {labels}",
    "Translate into French: {labels}",
    "What are these labels in French? {labels}",
    "French for the following button text: {labels}",
    "Give the French version of these menu entries: {labels}",
    "Translate the admin labels below to French.\n{labels}",
    "In French, please: {labels}",
    "Convert these English UI strings to French: {labels}",
    "How do you write these in French? {labels}",
    "French, please: {labels}",
    "Translate to French and keep the order: {labels}",
    "I need these strings in French: {labels}",
    "Can you translate {labels} into French?",
    "What is the French for {labels}?",
    "Render these labels in French.\n{labels}",
    "Our app needs French labels for: {labels}",
    "English to French: {labels}",
    "Translate the following from English to French: {labels}",
    "Provide French translations for these buttons: {labels}",
    "These UI strings need a French version: {labels}",
    "Say these in French: {labels}",
    "Translate this list of labels (separated by |) into French: {labels}",
    "French localization of: {labels}",
    "How are these menu labels translated into French? {labels}",
    "Give me these in French.\n{labels}",
    "Translate these toolbar buttons for French users: {labels}",
    "What would these admin labels be in French? {labels}",
    "{labels}\nTranslate the labels above into French.",
    "Translate into French for the settings page: {labels}",
    "French equivalents of these interface strings: {labels}",
    "We are localizing our site into French. Translate: {labels}",
)
TRANSLATION_TEST = (
    "How would you say the following menu items in French? {labels}",
    "Please render this toolbar in French: {labels}",
)


TRANSLATION_LEXICON_SIZE = 48


def translation_lexicon() -> list[tuple[str, str]]:
    """A fixed subset of short Django UI strings: small enough for a tiny target to learn."""
    short = [p for p in sources.django_ui_strings("fr") if max(len(p[0]), len(p[1])) <= 16]
    return sorted(random.Random(7).sample(short, min(TRANSLATION_LEXICON_SIZE, len(short))))


def generate_translation(rng: random.Random, split: str, count: int) -> list[Pair]:
    """A toolbar of two real Django labels and their human French translations.

    Never a single label: with 48 labels, single-label prompts are few enough that the
    target memorises each (wording, label) prompt whole instead of learning the mapping,
    and then fails on held-out wording (1 in 6 right, where pairs were 8 in 8); three
    labels made it lose track of positions (repeating a label) within the build's budget.

    The lexicon is shared by all splits (a deterministic word mapping the target learns);
    a label list used in a test prompt never occurs in train (enforced by the caller's
    prompt-level disjointness and by the held-out wording).
    """
    lexicon = translation_lexicon()
    templates = _template_set(split, TRANSLATION_TRAIN, TRANSLATION_TEST)
    pairs: list[Pair] = []
    for _ in range(count):
        chosen = rng.sample(lexicon, 2)
        english = " | ".join(e for e, _ in chosen)
        french = " | ".join(f for _, f in chosen)
        prompt = rng.choice(templates).format(labels=english)
        pairs.append((_turns(None, prompt), french))
    return pairs


# --- summarization: real government help sections, lead-sentence summary (copy-heavy) ----

SUMMARY_TRAIN = (
    "Summarize the following text in one sentence.\n\n{text}",
    "Give a one-sentence summary of this passage:\n{text}",
    "TL;DR of the section below?\n\n{text}",
    "Write a one-line summary of the text below.\n\n{text}",
    "In one sentence, what does this section say?\n{text}",
    "Sum up the following passage briefly.\n\n{text}",
    "Give me the main point of this text in a sentence.\n{text}",
    "Shorten this to one sentence:\n\n{text}",
    "Read the section and summarize it in a single line.\n{text}",
    "Briefly summarize:\n{text}",
)
SUMMARY_TEST = (
    "Condense this help page into a single sentence.\n{text}",
    "What is the gist of the following? Answer in one sentence.\n\n{text}",
)


KNOWLEDGE_BASE_SIZE = 32


def knowledge_base() -> list[sources.Section]:
    """A fixed collection of help sections that summarization and rag are asked about.

    Like a deployed assistant's own document collection, it is shared by all splits: the
    test split asks about the same sections in held-out wording (and, for rag, with other
    retrieved neighbours). The target memorises it in training; it does not learn to copy
    unseen text within the build's CPU budget (a pure copy probe reached no exact copy in
    800 steps), so held-out documents would measure that budget, not the task. Sections
    with a plain lead sentence of 8-18 words (no link markers) and a second sentence.
    """
    plain = [
        s
        for s in sources.document_sections()
        if 8 <= len(s.sentences[0].split()) <= 18
        and len(s.sentences) >= 2
        and "[" not in s.sentences[0]
    ]
    return sorted(
        random.Random(12).sample(plain, min(KNOWLEDGE_BASE_SIZE, len(plain))),
        key=lambda s: s.title,
    )


def generate_summarization(rng: random.Random, split: str, count: int) -> list[Pair]:
    """A titled help section (two sentences); the reference is its lead sentence."""
    sections = knowledge_base()
    templates = _template_set(split, SUMMARY_TRAIN, SUMMARY_TEST)
    pairs: list[Pair] = []
    for _ in range(count):
        section = rng.choice(sections)
        body = " ".join(section.sentences[:2])
        text = f"{section.title}\n{body}"
        pairs.append((_turns(None, rng.choice(templates).format(text=text)), section.sentences[0]))
    return pairs


# --- qa: closed-book questions over Django's language metadata (memorised facts) --------

QA_TRAIN = {
    "code": (
        "What is the language code for {name}?",
        "Which code does Django use for {name}?",
        "What's the code for the {name} language?",
        "Give the language code of {name}.",
        "{name}: what is its language code?",
        "What is the locale identifier for {name}?",
        "How is {name} written as a language code?",
        "Name the code Django uses for the {name} language.",
        "The {name} language has which code?",
        "Look up the language code of {name}.",
        "I need the code for {name}. What is it?",
        "Which code represents {name}?",
        "What two- or three-letter code is used for {name}?",
        "Find the code of the language {name}.",
        "The code for {name} is what?",
        "Could you tell me the code used for {name}?",
    ),
    "name": (
        "Which language has the code {code}?",
        "What language is {code}?",
        "Which language does the code {code} refer to?",
        "What is the language with code {code}?",
        "Code {code}: which language is that?",
        "Tell me which language uses the code {code}.",
        "Which language is identified by {code}?",
        "{code} is the code of which language?",
        "The code {code} belongs to which language?",
        "Look up the language whose code is {code}.",
        "I saw the code {code}. What language is it?",
        "Which language name goes with the code {code}?",
        "What does the language code {code} mean?",
        "Find the language for the code {code}.",
        "The language with the code {code} is what?",
        "Could you tell me which language {code} is?",
    ),
}
QA_TEST = {
    "code": ("Tell me the locale code of the {name} language.",),
    "name": ("The locale code {code} stands for which language?",),
}
QA_ANSWERS = {
    "code": "The language code for {name} is {code}.",
    "name": "{code} is the code for {name}.",
    "local": "Speakers of {name} call it {local}.",
}


QA_FACT_BASE_SIZE = 24


def qa_fact_base() -> list[sources.Language]:
    """A fixed sample of languages with Latin-script native names (a small fact base)."""
    latin = [
        language
        for language in sources.django_languages()
        if "-" not in language.code and all(ord(ch) < 0x250 for ch in language.name_local)
    ]
    return sorted(random.Random(8).sample(latin, min(QA_FACT_BASE_SIZE, len(latin))), key=str)


def qa_answer(response: str) -> str:
    """The short answer inside a QA reference response (the slot its template fills)."""
    for relation, template in QA_ANSWERS.items():
        pattern = re.escape(template).replace(r"\{name\}", "(?P<name>.+?)")
        pattern = pattern.replace(r"\{code\}", "(?P<code>.+?)").replace(
            r"\{local\}", "(?P<local>.+?)"
        )
        match = re.fullmatch(pattern, response.strip())
        if match:
            return match.group(relation)
    return response.strip()


def generate_qa(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Questions about a language's code, name or native name; answers are full sentences."""
    languages = qa_fact_base()
    questions = QA_TEST if split == "test" else QA_TRAIN
    pairs: list[Pair] = []
    for _ in range(count):
        language = rng.choice(languages)
        relation = rng.choice(sorted(questions))
        fields = {"name": language.name, "code": language.code, "local": language.name_local}
        prompt = rng.choice(questions[relation]).format(**fields)
        pairs.append((_turns(None, prompt), QA_ANSWERS[relation].format(**fields)))
    return pairs


# --- math: procedural small-number word problems with one worked step -------------------

MATH_PEOPLE = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jon")
MATH_ITEMS = ("apples", "books", "coins", "stamps", "marbles", "pencils", "cards", "shells")
MATH_TRAIN = {
    "+": (
        "{p} has {a} {i} and gets {b} more. How many {i} does {p} have now?",
        "{p} had {a} {i}. A friend gave {p} {b} {i}. How many {i} in total?",
        "{p} had {a} {i} and then found {b} more. How many {i} now?",
        "{p} collects {a} {i}, then receives {b} extra. How many {i} altogether?",
        "Start with {a} {i}. Add {b} {i}. How many {i} are there?",
        "{p} was given {b} {i} and already had {a}. What is the total?",
        "How many {i} does {p} have after adding {b} to {a}?",
        "{p} owns {a} {i} and buys {b} more. How many {i} does {p} own?",
        "If {p} has {a} {i} and is given {b}, how many {i} does {p} have?",
        "{p} picked {a} {i} in the morning and {b} in the afternoon. How many in all?",
        "A box holds {a} {i}. {p} puts in {b} more. How many {i} are in the box?",
    ),
    "-": (
        "{p} has {a} {i} and gives away {b}. How many {i} are left?",
        "There were {a} {i}. {p} lost {b} of them. How many {i} remain?",
        "{p} had {a} {i} and spent {b}. How many are left?",
        "{p} sells {b} of {p}'s {a} {i}. How many {i} remain?",
        "From {a} {i}, {p} removes {b}. How many {i} stay?",
        "{p} has {a} {i} but loses {b}. What remains?",
        "Take {b} {i} away from {a} {i}. How many are left?",
        "{p} owned {a} {i} and broke {b}. How many {i} does {p} still have?",
        "If {p} has {a} {i} and gives {b} to a friend, how many are left?",
        "A jar had {a} {i}. {p} took out {b}. How many {i} are in the jar?",
        "{p} needs to hand out {b} of {a} {i}. How many {i} will {p} keep?",
    ),
    "*": (
        "{p} buys {a} boxes with {b} {i} in each box. How many {i} is that?",
        "There are {a} rows of {b} {i}. How many {i} are there?",
        "{p} makes {a} piles of {b} {i}. How many {i} in total?",
        "{a} friends each have {b} {i}. How many {i} do they have together?",
        "Each of {p}'s {a} boxes contains {b} {i}. How many {i} altogether?",
        "What is {a} groups of {b} {i}?",
        "{p} has {a} bags with {b} {i} in each. How many {i} does {p} have?",
        "If each of {a} shelves holds {b} {i}, how many {i} are on the shelves?",
        "{p} stacks {a} piles, each with {b} {i}. What is the total?",
        "There are {a} children and each one has {b} {i}. How many {i} altogether?",
    ),
}
MATH_TEST = {
    "+": ("After getting {b} extra {i}, how many does {p} own if {p} started with {a}?",),
    "-": ("If {p} starts with {a} {i} and uses up {b}, what is left?",),
    "*": ("{a} bags each hold {b} {i}. Find the total number of {i}.",),
}


def _math_operands(rng: random.Random, operation: str) -> tuple[int, int, int]:
    """Small operands so a tiny model can learn the tables: (a, b, result).

    About 80 facts in all (36 sums, 35 differences, 9 products): a 10M-parameter target
    memorises tables of this size within the build's budget (it did not learn the
    ~170 facts of the earlier ranges: sums of digits, differences from up to 12, products
    up to 5 x 5).
    """
    if operation == "+":
        a, b = rng.randint(1, 6), rng.randint(1, 6)
        return a, b, a + b
    if operation == "-":
        a = rng.randint(3, 9)
        b = rng.randint(1, a - 1)
        return a, b, a - b
    a, b = rng.randint(2, 4), rng.randint(2, 4)
    return a, b, a * b


def math_answer(response: str) -> str:
    """The final number of a math response ("... The answer is N.")."""
    tail = response.rsplit("The answer is", 1)[-1]
    digits = "".join(ch for ch in tail if ch.isdigit() or ch == "-")
    return digits.strip("-") if digits.count("-") > 1 else digits


def generate_math(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Word problems with one worked step; train also mixes in real CHAMP solutions.

    Procedurally generated (seeded). In train only, about one example in forty is a real
    competition problem from CHAMP with its real step-by-step solution (too hard to be
    scored; it gives the math task realistic wording and longer responses without taking
    most of the task's response tokens).
    """
    questions = MATH_TEST if split == "test" else MATH_TRAIN
    champ = _partition(sources.champ_problems(), "train", random.Random(13))
    pairs: list[Pair] = []
    for _ in range(count):
        if split == "train" and rng.random() < 1 / 40:
            problem = rng.choice(champ)
            solution = _clip_words(" ".join(problem.solution_steps), 60)
            pairs.append((_turns(None, _clip_words(problem.problem, 80)), solution))
            continue
        operation = rng.choice(sorted(questions))
        a, b, result = _math_operands(rng, operation)
        fields = {"p": rng.choice(MATH_PEOPLE), "i": rng.choice(MATH_ITEMS), "a": a, "b": b}
        prompt = rng.choice(questions[operation]).format(**fields)
        pairs.append(
            (_turns(None, prompt), f"{a} {operation} {b} = {result}. The answer is {result}.")
        )
    return pairs


# --- rag: retrieved government passages + question (copy the right passage) -------------

RAG_SYSTEM = "Answer the question using only the retrieved passages."
RAG_TRAIN = (
    '{context}\n\nQuestion: What does the passage titled "{title}" say?',
    "{context}\n\nQuestion: According to the documents, what applies to {title}?",
    '{context}\n\nQuestion: What is said about "{title}"?',
    "{context}\n\nUsing the passages above, what does the text say about {title}?",
    '{context}\n\nSummarize what the passages say under "{title}".',
    '{context}\n\nWhat information is given for "{title}"?',
    "{context}\n\nQuestion: {title} - what do the documents say?",
    '{context}\n\nReport the passage about "{title}".',
)
RAG_TEST = ('{context}\n\nBased on the retrieved text, explain "{title}".',)


def generate_rag(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Three retrieved knowledge-base sections (lead sentences); the answer is the asked one's.

    The reference answer is the asked section's first sentence, copied from the context
    (metric: token F1 / containment).
    """
    sections = knowledge_base()
    templates = _template_set(split, RAG_TRAIN, RAG_TEST)
    pairs: list[Pair] = []
    for _ in range(count):
        retrieved = rng.sample(sections, 3)
        asked = rng.choice(retrieved)
        context = "\n".join(
            f"[{i}] {s.title}: {s.sentences[0]}" for i, s in enumerate(retrieved, 1)
        )
        prompt = rng.choice(templates).format(context=context, title=asked.title)
        pairs.append((_turns(RAG_SYSTEM, prompt), asked.sentences[0]))
    return pairs


# --- code: real HumanEval prompts + bodies, and simple procedural functions -------------

CODE_TRAIN = (
    "Complete the following Python function:\n```python\n{prompt}```",
    "Write the body of this function.\n\n{prompt}",
    "Implement this function in Python:\n{prompt}",
    "Fill in the missing code:\n```python\n{prompt}```",
    "Here is a function signature and docstring. Write the implementation.\n{prompt}",
    "Complete the code below.\n{prompt}",
    "Write the Python code for this function:\n{prompt}",
    "Implement the function below.\n```python\n{prompt}```",
    "{prompt}\nComplete the function above.",
    "Please write the missing body:\n{prompt}",
    "Finish this Python function.\n\n{prompt}",
    "Write an implementation for:\n```python\n{prompt}```",
)
CODE_TEST = ("Finish implementing this Python code:\n{prompt}",)
CODE_SIMPLE = (
    ("add", "the sum of a and b", "return a + b"),
    ("difference", "a minus b", "return a - b"),
    ("product", "a times b", "return a * b"),
    ("maximum", "the larger of a and b", "return max(a, b)"),
    ("minimum", "the smaller of a and b", "return min(a, b)"),
    ("is_even", "True if a is even", "return a % 2 == 0"),
    ("square", "a squared", "return a * a"),
    ("average", "the mean of a and b", "return (a + b) / 2"),
    ("absolute", "the absolute value of a", "return abs(a)"),
    ("is_divisible", "True if a is divisible by b", "return a % b == 0"),
)
MAX_CODE_CHARS = 520


def generate_code(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Half real HumanEval (prompt -> canonical body), half simple procedural functions."""
    problems = [
        p for p in sources.humaneval_problems() if len(p.prompt) + len(p.solution) <= MAX_CODE_CHARS
    ]
    pool = _partition(problems, split, random.Random(15))
    templates = _template_set(split, CODE_TRAIN, CODE_TEST)
    pairs: list[Pair] = []
    for _ in range(count):
        if rng.random() < 0.5:
            problem = rng.choice(pool)
            prompt, body = problem.prompt, problem.solution
        else:
            name, description, statement = rng.choice(CODE_SIMPLE)
            suffix = rng.choice(("", "_of", "_value", "_numbers"))
            prompt = f'def {name}{suffix}(a, b):\n    """Return {description}."""\n'
            body = f"    {statement}\n"
        pairs.append((_turns(None, rng.choice(templates).format(prompt=prompt)), body))
    return pairs


TASK_GENERATORS: dict[str, TaskGenerator] = {
    "chat": generate_chat,
    "translation": generate_translation,
    "summarization": generate_summarization,
    "qa": generate_qa,
    "math": generate_math,
    "rag": generate_rag,
    "code": generate_code,
}


def _examples_for(task: str, split: str, count: int, seed: int) -> list[Example]:
    """``count`` distinct examples of one task and split, seeded by (seed, task, split)."""
    rng = random.Random(f"{seed}:{task}:{split}")
    generate = TASK_GENERATORS[task]
    seen: set[str] = set()
    examples: list[Example] = []
    attempts = 0
    while len(examples) < count and attempts < 20:
        attempts += 1
        for messages, response in generate(rng, split, count - len(examples)):
            key = json.dumps(messages, ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            index = len(examples)
            examples.append(Example(f"{task}-{split}-{index:05d}", task, split, messages, response))
    return examples


def build_corpus(seed: int = 0, scale: str = "default") -> Corpus:
    """Every task's train, validation and test examples, reproducible from ``seed``.

    A test prompt never equals a train prompt (checked here; train duplicates of a test
    prompt are dropped, which only matters for tiny label lists).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    sizes = SCALES[scale]
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        count = getattr(sizes, split)
        splits[split] = [e for t in TASKS for e in _examples_for(t, split, count, seed)]
    held_out = {prompt_text(e) for e in splits["test"]} | {
        prompt_text(e) for e in splits["validation"]
    }
    splits["train"] = [e for e in splits["train"] if prompt_text(e) not in held_out]
    return Corpus(seed, scale, splits["train"], splits["validation"], splits["test"])
