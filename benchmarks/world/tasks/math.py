"""math: procedurally generated problems with rule-based, step-by-step worked solutions.

Six kinds, all seeded: word problems of two or three steps, arithmetic asked in words,
linear equations, change from a purchase, percentages and rates (so much a day, for n
days). Every number the solution writes (operands, intermediate and final results) stays
between 0 and 10, so a tiny target can learn the
arithmetic table (~100 facts); the solution restates each step, so answers are several
sentences long. In training only, about one example in forty is a real competition
problem from CHAMP with its real solution (too hard to be scored; it adds real wording).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from benchmarks.world import sources
from benchmarks.world.tasks.common import Pair, clip_words, partition, template_set, turns

MAX_VALUE = 10
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
PEOPLE = (
    "Ana",
    "Ben",
    "Chloe",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jon",
    "Kofi",
    "Lena",
)
ITEMS = (
    "apples",
    "books",
    "coins",
    "stamps",
    "marbles",
    "pencils",
    "cards",
    "shells",
    "eggs",
    "stickers",
)
CHAMP_SHARE = 1 / 40

# A story: a start, one or two events, a question. {p} person, {i} items, {a}/{b} numbers.
STORY_STARTS = (
    "{p} has {a} {i}.",
    "{p} starts the day with {a} {i}.",
    "There are {a} {i} in {p}'s bag.",
)
STORY_EVENTS = {
    "+": (
        "Then {p} gets {b} more.",
        "A friend gives {p} {b} {i}.",
        "{p} finds {b} more {i}.",
        "Later {p} buys {b} {i}.",
    ),
    "-": (
        "Then {p} gives away {b}.",
        "{p} loses {b} {i}.",
        "{p} uses {b} of them.",
        "{p} gives {b} {i} to a friend.",
    ),
}
STORY_QUESTIONS_TRAIN = (
    "How many {i} does {p} have now?",
    "How many {i} are left?",
    "How many {i} does {p} end up with?",
    "What is the number of {i} at the end?",
    "Count the {i} {p} has at the end.",
)
STORY_QUESTIONS_TEST = ("How many {i} remain with {p} in the end?",)
STORY_STEP = {
    "+": "{p} gets {b} more, so {p} has {x} + {b} = {y} {i}.",
    "-": "{p} gives away {b}, so {p} has {x} - {b} = {y} {i}.",
}
WORDS_STEP = {"+": "Adding {b}", "-": "Subtracting {b}", "*": "Multiplying by {b}"}

WORDS_TRAIN = (
    "What is {expression}?",
    "Compute {expression}.",
    "Calculate {expression}, step by step.",
    "How much is {expression}?",
    "Work out {expression}.",
    "What do you get for {expression}?",
    "Please evaluate {expression}.",
    "Quick math: {expression}?",
)
WORDS_TEST = ("Can you figure out {expression} for me?",)
OPERATION_WORDS = {"+": ("plus", "add"), "-": ("minus", "take away"), "*": ("times", "multiply by")}

EQUATION_TRAIN = (
    "Solve for x: {equation}",
    "Find x if {equation}.",
    "What is x in {equation}?",
    "Solve the equation {equation}.",
    "{equation}. What is the value of x?",
)
EQUATION_TEST = ("Determine x such that {equation}.",)

CHANGE_TRAIN = (
    "{p} buys {n} {i} at {m} dollars each and pays with a 10-dollar bill. How much change?",
    "{n} {i} cost {m} dollars each. {p} pays with 10 dollars. What is the change?",
    "If {p} hands over 10 dollars for {n} {i} that cost {m} dollars each, how much comes back?",
    "Each of the {i} costs {m} dollars. {p} takes {n} and pays 10 dollars. How much change is due?",
)
CHANGE_TEST = (
    "With 10 dollars, {p} pays for {n} {i} priced at {m} dollars each. What change is left?",
)


def math_answer(response: str) -> str:
    """The final number of a math response ("... The answer is N.")."""
    tail = response.rsplit("The answer is", 1)[-1]
    digits = "".join(ch for ch in tail if ch.isdigit() or ch == "-")
    return digits.strip("-") if digits.count("-") > 1 else digits


def _apply(value: int, operation: str, operand: int) -> int:
    return {"+": value + operand, "-": value - operand, "*": value * operand}[operation]


def _next_step(
    rng: random.Random, value: int, operations: str, smallest: int = 1
) -> tuple[str, int] | None:
    """An operation and operand (at least ``smallest``) keeping the result within
    0..MAX_VALUE (None if none does)."""
    choices = []
    for operation in operations:
        for operand in range(smallest, MAX_VALUE + 1):
            if operation == "*" and operand == 1:
                continue
            if 0 <= _apply(value, operation, operand) <= MAX_VALUE:
                choices.append((operation, operand))
    return rng.choice(choices) if choices else None


def _story(rng: random.Random, split: str) -> Pair:
    fields = {"p": rng.choice(PEOPLE), "i": rng.choice(ITEMS)}
    value = rng.randint(2, 9)
    sentences = [rng.choice(STORY_STARTS).format(a=value, **fields)]
    steps = [f"{fields['p']} starts with {value} {fields['i']}."]
    for _ in range(rng.choice((2, 2, 3))):
        step = _next_step(rng, value, "+-", smallest=2)  # "1 apples" reads badly
        if step is None:
            break
        operation, operand = step
        result = _apply(value, operation, operand)
        sentences.append(rng.choice(STORY_EVENTS[operation]).format(b=operand, **fields))
        steps.append(STORY_STEP[operation].format(x=value, b=operand, y=result, **fields))
        value = result
    questions = template_set(split, STORY_QUESTIONS_TRAIN, STORY_QUESTIONS_TEST)
    sentences.append(rng.choice(questions).format(**fields))
    steps.append(f"At the end {fields['p']} has {value} {fields['i']}.")
    steps.append(f"The answer is {value}.")
    return turns(None, " ".join(sentences)), "\n".join(steps)


def _number(rng: random.Random, value: int) -> str:
    return NUMBER_WORDS[value] if rng.random() < 0.5 else str(value)


def _arithmetic_in_words(rng: random.Random, split: str) -> Pair:
    """A chain of two or three operations, read left to right ("..., then ...")."""
    value = rng.randint(1, 9)
    phrase = _number(rng, value)
    steps = [f"We start with {value}."]
    for index in range(rng.choice((2, 2, 3))):
        step = _next_step(rng, value, "+-*" if value <= 5 else "+-")
        if step is None:
            break
        operation, operand = step
        result = _apply(value, operation, operand)
        word = rng.choice(OPERATION_WORDS[operation])
        phrase += f"{', then' if index else ''} {word} {_number(rng, operand)}"
        lead = WORDS_STEP[operation].format(b=operand)
        steps.append(f"{lead} gives {value} {operation} {operand} = {result}.")
        value = result
    prompt = rng.choice(template_set(split, WORDS_TRAIN, WORDS_TEST)).format(expression=phrase)
    return turns(None, prompt), "\n".join([*steps, f"The answer is {value}."])


def _equation(rng: random.Random, split: str) -> Pair:
    a = rng.choice((2, 3))
    x = rng.randint(1, MAX_VALUE // a)
    b = rng.randint(1, MAX_VALUE - a * x) if a * x < MAX_VALUE else 0
    c = a * x + b
    equation = f"{a}x + {b} = {c}" if b else f"{a}x = {c}"
    steps = [f"We want x in {equation}."]
    if b:
        steps.append(f"Subtract {b} from both sides: {a}x = {c} - {b} = {a * x}.")
    steps.append(f"Divide both sides by {a}: x = {a * x} / {a} = {x}.")
    check = f"{a} * {x} + {b} = {a * x} + {b} = {c}" if b else f"{a} * {x} = {c}"
    steps.append(f"Check: {check}.")
    prompt = rng.choice(template_set(split, EQUATION_TRAIN, EQUATION_TEST)).format(
        equation=equation
    )
    return turns(None, prompt), "\n".join([*steps, f"The answer is x = {x}."])


def _change(rng: random.Random, split: str) -> Pair:
    n, m = rng.choice([(n, m) for n in range(2, 6) for m in range(1, 6) if n * m <= MAX_VALUE])
    fields = {"p": rng.choice(PEOPLE), "i": rng.choice(ITEMS), "n": n, "m": m}
    total = n * m
    prompt = rng.choice(template_set(split, CHANGE_TRAIN, CHANGE_TEST)).format(**fields)
    steps = [
        f"{fields['p']} buys {n} {fields['i']} at {m} dollars each.",
        f"The {fields['i']} cost {n} * {m} = {total} dollars.",
        f"{fields['p']} pays with 10 dollars.",
        f"The change is 10 - {total} = {10 - total} dollars.",
        f"The answer is {10 - total}.",
    ]
    return turns(None, prompt), "\n".join(steps)


PERCENT_TRAIN = (
    "What is {percent}% of {n}?",
    "Calculate {percent} percent of {n}.",
    "How much is {percent}% of {n}?",
    "Find {percent}% of {n}.",
    "{p} has {n} {i} and gives away {percent}% of them. How many is that?",
)
PERCENT_TEST = ("Work out {percent} percent of {n}, please.",)
RATE_TRAIN = (
    "{p} earns {m} dollars a day. How much does {p} earn in {n} days?",
    "A ticket costs {m} dollars a week. How much do {n} weeks cost?",
    "{p} reads {m} pages every day. How many pages in {n} days?",
    "The rent for a locker is {m} dollars a month. What does it cost for {n} months?",
    "{p} saves {m} dollars each week. How much is saved after {n} weeks?",
)
RATE_TEST = ("At {m} dollars per day, what do {n} days cost {p}?",)


def _percent(rng: random.Random, split: str) -> Pair:
    percent, parts = rng.choice(((50, 2), (25, 4), (20, 5), (10, 10)))
    result = rng.randint(1, MAX_VALUE // parts)  # n = result * parts stays within 0..10
    n = result * parts
    fields = {"p": rng.choice(PEOPLE), "i": rng.choice(ITEMS), "percent": percent, "n": n}
    prompt = rng.choice(template_set(split, PERCENT_TRAIN, PERCENT_TEST)).format(**fields)
    steps = [
        f"{percent}% means 1 part in {parts}.",
        f"{percent}% of {n} is {n} / {parts} = {result}.",
        f"The answer is {result}.",
    ]
    return turns(None, prompt), "\n".join(steps)


def _rate(rng: random.Random, split: str) -> Pair:
    n, m = rng.choice([(n, m) for n in range(2, 6) for m in range(1, 6) if n * m <= MAX_VALUE])
    fields = {"p": rng.choice(PEOPLE), "n": n, "m": m}
    prompt = rng.choice(template_set(split, RATE_TRAIN, RATE_TEST)).format(**fields)
    steps = [
        f"Each period gives {m}, and there are {n} periods.",
        f"In all: {n} * {m} = {n * m}.",
        f"The answer is {n * m}.",
    ]
    return turns(None, prompt), "\n".join(steps)


MATH_KINDS: dict[str, Callable[[random.Random, str], Pair]] = {
    "story": _story,
    "words": _arithmetic_in_words,
    "equation": _equation,
    "change": _change,
    "percent": _percent,
    "rate": _rate,
}
KIND_WEIGHTS = {"story": 4, "words": 3, "equation": 2, "change": 1, "percent": 1, "rate": 1}


def generate_math(rng: random.Random, split: str, count: int) -> list[Pair]:
    """Procedural problems with worked solutions; train also mixes in real CHAMP problems."""
    champ = partition(sources.champ_problems(), 13)["train"]
    kinds = sorted(MATH_KINDS)
    weights = [KIND_WEIGHTS[k] for k in kinds]
    pairs: list[Pair] = []
    for _ in range(count):
        if split == "train" and rng.random() < CHAMP_SHARE:
            problem = rng.choice(champ)
            solution = clip_words(" ".join(problem.solution_steps), 60)
            pairs.append((turns(None, clip_words(problem.problem, 80)), solution))
            continue
        kind = rng.choices(kinds, weights)[0]
        pairs.append(MATH_KINDS[kind](rng, split))
    return pairs
