"""What the synthetic corpus says: connected digit strings (``digits``) and smart-home commands (``commands``).

Texts are lower-case words separated by single spaces. Every text belongs to exactly one split, decided by a
stable hash of its *content* (:func:`split_of`): "four oh seven" and "four zero seven" are the same digit
sequence and land in the same split, so no test sequence or command is ever trained on, whatever the profile.
"""

from __future__ import annotations

import hashlib
import itertools
import re

import numpy as np

TASKS = ("digits", "commands")

# Percent of all possible texts owned by each split (by hash). Test gets more than dev so that it can draw
# thousands of utterances without repeating the short sequences too often.
SPLIT_PERCENT = {"train": 70, "dev": 10, "test": 20}

TEXT_PATTERN = re.compile(r"[a-z]+( [a-z]+)*")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ZERO_WORDS = ("zero", "oh")  # how 0 is spoken; drawn per occurrence, as people mix them
MAX_DIGITS = 7

_DIGIT_OF_WORD = {word: str(d) for d, word in enumerate(DIGIT_WORDS)} | {"oh": "0"}

# The command grammar: each template is a sequence of slots, each slot a tuple of alternatives (multi-word
# alternatives allowed; an empty alternative drops the slot). Every combination is a command: 624 commands of
# 79 words.
_ROOMS = ("kitchen", "bedroom", "living room", "bathroom", "garage", "office", "hallway")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "fifteen", "twenty", "thirty")
_HOURS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
_COMMANDS = (
    (("turn on", "turn off", "switch on", "switch off"), ("the",), _ROOMS, ("lights", "lamp", "fan", "heater")),
    (("dim", "brighten"), ("the",), _ROOMS, ("lights",)),
    (("open", "close"), ("the",), _ROOMS, ("door", "window", "blinds")),
    (("set a timer for",), _NUMBERS, ("seconds", "minutes", "hours")),
    (("set an alarm for",), _HOURS, ("in the morning", "in the evening")),
    (("set the",), _ROOMS, ("temperature to",), ("sixty", "seventy"), ("", "five"), ("degrees",)),
    (("play", "stop"), ("music", "the radio", "the news"), ("in the",), _ROOMS),
    (("what is the weather",), ("today", "tomorrow", "tonight")),
    (("lock", "unlock"), ("the",), ("front", "back", "garage"), ("door",)),
    (("volume up", "volume down", "pause", "resume", "next song"),),
)
COMMAND_TEMPLATES: tuple[tuple[tuple[str, ...], ...], ...] = tuple(t + (("", "please"),) for t in _COMMANDS)


def split_of(task: str, text: str) -> str:
    """The split that owns ``text``: a stable hash of its content (digits: the digit sequence)."""
    key = _digit_sequence(text) if _check_task(task) == "digits" else text
    bucket = int.from_bytes(hashlib.sha256(f"{task}:{key}".encode()).digest()[:8], "big") % 100
    for split, upper in zip(SPLIT_PERCENT, itertools.accumulate(SPLIT_PERCENT.values())):
        if bucket < upper:
            return split
    raise AssertionError(f"SPLIT_PERCENT must sum to 100: {SPLIT_PERCENT}")


def draw_text(task: str, split: str, rng: np.random.Generator) -> str:
    """One text of ``task`` owned by ``split``, drawn with ``rng``.

    Draws from the whole grammar and rejects texts of other splits, so each split sees the grammar's own
    distribution restricted to its texts (expected draws: 100 / SPLIT_PERCENT[split]).
    """
    if split not in SPLIT_PERCENT:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLIT_PERCENT)}")
    draw = _draw_digits if _check_task(task) == "digits" else _draw_command
    while True:
        text = draw(rng)
        if split_of(task, text) == split:
            return text


def vocabulary(task: str) -> list[str]:
    """Every word ``task`` can produce, sorted."""
    if _check_task(task) == "digits":
        return sorted(set(DIGIT_WORDS) | set(ZERO_WORDS))
    words = {w for template in COMMAND_TEMPLATES for slot in template for alt in slot for w in alt.split()}
    return sorted(words)


def all_commands() -> list[str]:
    """Every command the grammar generates, in grammar order."""
    return [_join(parts) for template in COMMAND_TEMPLATES for parts in itertools.product(*template)]


def _draw_digits(rng: np.random.Generator) -> str:
    length = int(rng.integers(1, MAX_DIGITS + 1))
    digits = rng.integers(0, 10, size=length)
    return " ".join(ZERO_WORDS[rng.integers(len(ZERO_WORDS))] if d == 0 else DIGIT_WORDS[d] for d in digits)


def _draw_command(rng: np.random.Generator) -> str:
    template = COMMAND_TEMPLATES[rng.integers(len(COMMAND_TEMPLATES))]
    return _join(slot[rng.integers(len(slot))] for slot in template)


def _join(parts) -> str:
    return " ".join(p for p in parts if p)


def _digit_sequence(text: str) -> str:
    try:
        return "".join(_DIGIT_OF_WORD[w] for w in text.split(" "))
    except KeyError as e:
        raise ValueError(f"not a digit string: {text!r} (unknown word {e.args[0]!r})") from None


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    return task
