"""code: real HumanEval problems (MIT) and procedurally generated list functions.

A third of the examples are HumanEval (signature + docstring -> the canonical body),
partitioned by problem. The rest are generated: a family of loop (count, keep, sum, any,
all, first, index, remove) applied to a condition (even, positive, above a limit, ...),
asked as a stub to complete (answer: the body) or in words (answer: the whole function).
The body follows from the docstring by a fixed rule, so a small model can learn it;
(family, condition) combinations are partitioned, so a test function's body is never in
training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cache

from benchmarks.world import sources
from benchmarks.world.tasks.common import Pair, clean_partition, partition, template_set, turns

HUMANEVAL_SHARE = 1 / 3
MAX_HUMANEVAL_CHARS = 700  # prompt + body, so an example fits a training row

STUB_TRAIN = (
    "Complete the following Python function:\n```python\n{stub}```",
    "Write the body of this function.\n\n{stub}",
    "Implement this function in Python:\n{stub}",
    "Fill in the missing code:\n```python\n{stub}```",
    "Here is a function signature and docstring. Write the implementation.\n{stub}",
    "Complete the code below.\n{stub}",
    "{stub}\nComplete the function above.",
    "Please write the missing body:\n{stub}",
    "Finish this Python function.\n\n{stub}",
    "Write an implementation for:\n```python\n{stub}```",
    "Can you implement this?\n```python\n{stub}```",
    "TODO: implement\n{stub}",
)
STUB_TEST = (
    "Finish implementing this Python code:\n{stub}",
    "Here's a stub, please complete it:\n```python\n{stub}```",
)
REQUEST_TRAIN = (
    "Write a Python function {signature} that {task}.",
    "Write a Python function to {task_verb}.",
    "How do I {task_verb} in Python? Write a function.",
    "I need a function to {task_verb}.",
    "Can you write a function called {name} in Python? It should {task_verb}.",
    "I need a Python function {signature} which {task}.",
    "Implement {signature} in Python: it {task}.",
    "Python: write {name}, a function that {task}.",
    "Show me how to write a function {signature} that {task}.",
    "Write code for {signature}. The function {task}.",
    "Create a Python function named {name} that {task}.",
)
REQUEST_TEST = ("How would you code a Python function {signature} that {task}?",)


@dataclass(frozen=True)
class Condition:
    """A test on one element: its name in identifiers, its words, its expression."""

    name: str
    words: str
    expression: str  # with {v} for the element
    parameter: str = ""  # an extra argument the test needs ("" if none)


CONDITIONS: tuple[Condition, ...] = (
    Condition("even", "even", "{v} % 2 == 0"),
    Condition("odd", "odd", "{v} % 2 == 1"),
    Condition("positive", "positive", "{v} > 0"),
    Condition("negative", "negative", "{v} < 0"),
    Condition("zero", "equal to zero", "{v} == 0"),
    Condition("nonzero", "not zero", "{v} != 0"),
    Condition("above", "greater than limit", "{v} > limit", "limit"),
    Condition("below", "smaller than limit", "{v} < limit", "limit"),
    Condition("multiple", "divisible by k", "{v} % k == 0", "k"),
)


@dataclass(frozen=True)
class Family:
    """A loop pattern: the function-name prefix, what it returns in words, its body."""

    prefix: str
    returns: str  # "{seq}" and "{cond}" slots: the docstring's description
    does: str  # the same as a verb phrase ("count the ...")
    body: str  # "{v}", "{seq}", "{cond}" slots; four-space indentation
    annotation: str


FAMILIES: tuple[Family, ...] = (
    Family(
        "count",
        "how many numbers in {seq} are {cond}",
        "count the numbers in {seq} that are {cond}",
        "    count = 0\n    for {v} in {seq}:\n        if {cond}:\n            count += 1\n"
        "    return count\n",
        "int",
    ),
    Family(
        "keep",
        "a list of the numbers in {seq} that are {cond}",
        "return the numbers in {seq} that are {cond}",
        "    result = []\n    for {v} in {seq}:\n        if {cond}:\n"
        "            result.append({v})\n    return result\n",
        "list[int]",
    ),
    Family(
        "sum",
        "the sum of the numbers in {seq} that are {cond}",
        "add up the numbers in {seq} that are {cond}",
        "    total = 0\n    for {v} in {seq}:\n        if {cond}:\n            total += {v}\n"
        "    return total\n",
        "int",
    ),
    Family(
        "any",
        "True if any number in {seq} is {cond}, else False",
        "check whether any number in {seq} is {cond}",
        "    for {v} in {seq}:\n        if {cond}:\n            return True\n    return False\n",
        "bool",
    ),
    Family(
        "all",
        "True if every number in {seq} is {cond}, else False",
        "check whether every number in {seq} is {cond}",
        "    for {v} in {seq}:\n        if not ({cond}):\n            return False\n"
        "    return True\n",
        "bool",
    ),
    Family(
        "first",
        "the first number in {seq} that is {cond}, or None if there is none",
        "find the first number in {seq} that is {cond}",
        "    for {v} in {seq}:\n        if {cond}:\n            return {v}\n    return None\n",
        "int | None",
    ),
    Family(
        "index",
        "the index of the first number in {seq} that is {cond}, or -1",
        "find the position of the first number in {seq} that is {cond}",
        "    for i, {v} in enumerate({seq}):\n        if {cond}:\n            return i\n"
        "    return -1\n",
        "int",
    ),
    Family(
        "remove",
        "a copy of {seq} without the numbers that are {cond}",
        "remove the numbers that are {cond} from {seq}",
        "    return [{v} for {v} in {seq} if not ({cond})]\n",
        "list[int]",
    ),
)
SEQUENCES = (
    ("numbers", "n"),
    ("values", "value"),
    ("nums", "x"),
    ("data", "item"),
    ("items", "item"),
)


@cache
def combination_pools() -> dict[str, list[tuple[Family, Condition]]]:
    """(family, condition) pairs split so that a test function's body is new to training."""
    return partition([(f, c) for f in FAMILIES for c in CONDITIONS], 17)


@cache
def humaneval_pools() -> dict[str, list[sources.CodeProblem]]:
    """HumanEval problems split by problem."""
    problems = [
        p
        for p in sources.humaneval_problems()
        if len(p.prompt) + len(p.solution) <= MAX_HUMANEVAL_CHARS
    ]
    return clean_partition(problems, 15, lambda p: [p.prompt + p.solution])


def _example_call(
    rng: random.Random, name: str, family: Family, condition: Condition, extra: int | None
) -> str:
    """A doctest line computed by running the rule on a small random list."""
    values = [rng.randint(-3, 9) for _ in range(rng.randint(3, 5))]
    env = {"limit": extra, "k": extra}

    def holds(v: int) -> bool:
        return bool(eval(condition.expression.format(v="v"), {}, {"v": v, **env}))

    kept = [v for v in values if holds(v)]
    result: object = {
        "count": len(kept),
        "keep": kept,
        "sum": sum(kept),
        "any": bool(kept),
        "all": len(kept) == len(values),
        "first": kept[0] if kept else None,
        "index": next((i for i, v in enumerate(values) if holds(v)), -1),
        "remove": [v for v in values if not holds(v)],
    }[family.prefix]
    args = f"{values}" + (f", {extra}" if condition.parameter else "")
    return f"    >>> {name}({args})\n    {result!r}\n"


def _procedural(rng: random.Random, split: str) -> Pair:
    family, condition = rng.choice(combination_pools()[split])
    seq, v = rng.choice(SEQUENCES)
    name = f"{family.prefix}_{condition.name}"
    cond = condition.expression.format(v=v)
    words = condition.words
    params = [seq] + ([condition.parameter] if condition.parameter else [])
    typed = rng.random() < 0.5
    if typed:
        arguments = ", ".join([f"{seq}: list[int]"] + [f"{p}: int" for p in params[1:]])
        signature = f"{name}({arguments}) -> {family.annotation}"
    else:
        signature = f"{name}({', '.join(params)})"
    body = family.body.format(v=v, seq=seq, cond=cond)
    description = family.returns.format(seq=seq, cond=words)
    if rng.random() < 0.45:
        docstring = f'    """Return {description}.\n'
        if rng.random() < 0.5:
            extra = rng.randint(2, 4) if condition.parameter else None
            docstring += _example_call(rng, name, family, condition, extra)
        stub = f'def {signature}:\n{docstring}    """\n'
        prompt = rng.choice(template_set(split, STUB_TRAIN, STUB_TEST)).format(stub=stub)
        return turns(None, prompt), body
    request = rng.choice(template_set(split, REQUEST_TRAIN, REQUEST_TEST))
    prompt = request.format(
        signature=signature,
        name=name,
        task=f"returns {description}",
        task_verb=family.does.format(seq=seq, cond=words),
    )
    docstring = f'    """Return {description}."""\n'
    # The lead names the function, so every 12-word run of the answer carries its
    # (family, condition): those are partitioned, so no run of a test answer is in training.
    lead = f"Here is {name}, which returns {description}:"
    return turns(None, prompt), f"{lead}\n```python\ndef {signature}:\n{docstring}{body}```"


def generate_code(rng: random.Random, split: str, count: int) -> list[Pair]:
    """A third real HumanEval (stub -> canonical body), the rest generated list functions."""
    problems = humaneval_pools()[split]
    stubs = template_set(split, STUB_TRAIN, STUB_TEST)
    pairs: list[Pair] = []
    for _ in range(count):
        if rng.random() < HUMANEVAL_SHARE:
            problem = rng.choice(problems)
            prompt = rng.choice(stubs).format(stub=problem.prompt)
            pairs.append((turns(None, prompt), problem.solution))
        else:
            pairs.append(_procedural(rng, split))
    return pairs
