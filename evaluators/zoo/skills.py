"""The synthetic skills of the toy zoo: training text and multiple-choice items.

Four skills, each a prompt of digits answered with digits::

    add 7 5 = 2          (a + b) mod 10
    succ 3 8 1 = 4 9 2   every digit plus one, mod 10
    rev 3 8 1 = 1 8 3    reversed
    sort 3 8 1 = 1 3 8   ascending

Each skill has a *hard region* (a carry for ``add``, three-digit inputs for the
sequence skills; two-digit inputs are easy) and a *systematic mistake* there, a
near-miss answer (``add``: one too many; ``succ``: last digit left as is;
``rev``: first two digits of the answer swapped; ``sort``: descending). The
pretraining mixture shows the mistake in most hard-region lines, so a base
model trained on it reliably prefers the mistake there and the right answer
elsewhere. That makes the base's accuracy reproducible: it does not hinge on
when a skill happens to "click" during training. A fine-tune on clean lines of
one skill fixes that skill's hard region (and forgets some of the others);
merging can fix several at once.

Every multiple-choice item offers the right answer, the systematic mistake and
two other near misses (off-by-one digits, swapped neighbours, the answer of a
confusable rule), so accuracy measures the rule, not the answer format.

All randomness comes from a ``random.Random`` passed in, so the same seed gives
the same text and items on any machine.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

DIGITS = [str(d) for d in range(10)]
# Fixed special tokens of the tokenizer; pad must be id 0 (see build.py).
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
EQUALS = "="

Key = tuple[int, ...]


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: ``prompt`` followed by one of ``choices``."""

    prompt: str
    choices: list[str]
    label: int
    hard: bool

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "choices": self.choices,
            "label": self.label,
            "hard": self.hard,
        }


def _words(seq: Key) -> str:
    return " ".join(str(d) for d in seq)


def _swap(seq: Key, i: int, j: int) -> Key:
    out = list(seq)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


class Skill(ABC):
    """A rule from a digit input (the *key*) to a digit answer, with a near-miss mistake."""

    name: str
    keyword: str

    @abstractmethod
    def keys(self) -> list[Key]:
        """Every possible input, in a fixed order (item splits are drawn from these)."""

    @abstractmethod
    def answer(self, key: Key) -> Key:
        """The right answer."""

    @abstractmethod
    def mistake(self, key: Key) -> Key:
        """The systematic near miss (differs from the answer for every key)."""

    @abstractmethod
    def near_misses(self, key: Key) -> list[Key]:
        """Other plausible wrong answers (may repeat each other or the mistake)."""

    @abstractmethod
    def is_hard(self, key: Key) -> bool:
        """Whether the pretraining mixture prefers the mistake for this key."""

    @abstractmethod
    def sample_key(self, rng: random.Random) -> Key:
        """A random input, drawn from the training distribution."""

    def prompt(self, key: Key) -> str:
        return f"{self.keyword} {_words(key)} {EQUALS}"

    def text(self, key: Key, wrong: bool = False) -> str:
        """One training line: the prompt followed by the right (or the mistaken) answer."""
        return f"{self.prompt(key)} {_words(self.mistake(key) if wrong else self.answer(key))}"

    def item(self, key: Key, rng: random.Random, n_choices: int = 4) -> Item:
        """A multiple-choice item whose distractors are the mistake plus other near misses."""
        right, wrong = self.answer(key), self.mistake(key)
        others = []
        for cand in self.near_misses(key):
            if cand not in (right, wrong) and cand not in others:
                others.append(cand)
        if len(others) < n_choices - 2:
            raise ValueError(f"{self.name}: not enough distinct near misses for {key}")
        choices = [right, wrong, *rng.sample(others, n_choices - 2)]
        rng.shuffle(choices)
        return Item(
            prompt=self.prompt(key),
            choices=[_words(c) for c in choices],
            label=choices.index(right),
            hard=self.is_hard(key),
        )


class AddSkill(Skill):
    """``add a b = (a+b) mod 10``; the mistake adds one more when there is a carry."""

    name = "add"
    keyword = "add"

    def keys(self) -> list[Key]:
        return [(a, b) for a in range(10) for b in range(10)]

    def answer(self, key: Key) -> Key:
        return ((key[0] + key[1]) % 10,)

    def mistake(self, key: Key) -> Key:
        return ((key[0] + key[1] + 1) % 10,)

    def near_misses(self, key: Key) -> list[Key]:
        s = key[0] + key[1]
        return [((s - 1) % 10,), ((s + 2) % 10,), ((key[0] - key[1]) % 10,)]

    def is_hard(self, key: Key) -> bool:
        return key[0] + key[1] >= 10

    def sample_key(self, rng: random.Random) -> Key:
        return (rng.randrange(10), rng.randrange(10))


class _SequenceSkill(Skill):
    """Skills over 2 or 3 distinct digits; three-digit inputs are the hard region.

    The skills' mistakes differ in kind, so a fine-tune that fixes one skill's
    mistake does not fix the others' for free.
    """

    lengths = (2, 3)
    hard_length = 3

    def keys(self) -> list[Key]:
        out: list[Key] = []
        for n in self.lengths:
            out.extend(_permutations(n))
        return out

    def is_hard(self, key: Key) -> bool:
        return len(key) == self.hard_length

    def sample_key(self, rng: random.Random) -> Key:
        return tuple(rng.sample(range(10), rng.choice(self.lengths)))

    def near_misses(self, key: Key) -> list[Key]:
        # Neighbour swaps and one digit off by one: near misses of any answer.
        y = self.answer(key)
        return [
            _swap(y, 0, 1),
            _swap(y, -2, -1),
            _bump(y, -1, 1),
            _bump(y, 0, 1),
            _bump(y, -1, -1),
            *self.confusable(key),
        ]

    def confusable(self, key: Key) -> list[Key]:
        """Answers of a confusable rule (e.g. the input copied unchanged)."""
        return []


class SuccSkill(_SequenceSkill):
    """``succ x = every digit plus one (mod 10)``; the mistake leaves the last digit as is."""

    name = "succ"
    keyword = "succ"

    def answer(self, key: Key) -> Key:
        return tuple((d + 1) % 10 for d in key)

    def mistake(self, key: Key) -> Key:
        return _bump(self.answer(key), -1, -1)

    def confusable(self, key: Key) -> list[Key]:
        return [key, _bump(self.answer(key), 0, -1)]


class ReverseSkill(_SequenceSkill):
    """``rev x = reversed x``; the mistake swaps the first two digits of the answer."""

    name = "rev"
    keyword = "rev"

    def answer(self, key: Key) -> Key:
        return key[::-1]

    def mistake(self, key: Key) -> Key:
        return _swap(key[::-1], 0, 1)

    def confusable(self, key: Key) -> list[Key]:
        return [key]


class SortSkill(_SequenceSkill):
    """``sort x = x ascending``; the mistake sorts descending."""

    name = "sort"
    keyword = "sort"

    def answer(self, key: Key) -> Key:
        return tuple(sorted(key))

    def mistake(self, key: Key) -> Key:
        return tuple(sorted(key, reverse=True))

    def confusable(self, key: Key) -> list[Key]:
        return [key]


def _bump(seq: Key, i: int, delta: int) -> Key:
    out = list(seq)
    out[i] = (out[i] + delta) % 10
    return tuple(out)


def _permutations(n: int) -> list[Key]:
    """All sequences of ``n`` distinct digits, in lexicographic order."""
    from itertools import permutations

    return list(permutations(range(10), n))


SKILLS: list[Skill] = [AddSkill(), SuccSkill(), ReverseSkill(), SortSkill()]


def vocabulary() -> list[str]:
    """Every token of the synthetic language, special tokens first (pad = id 0)."""
    return [*SPECIAL_TOKENS, *DIGITS, EQUALS, *(s.keyword for s in SKILLS)]


def mixture_text(rng: random.Random, skills: list[Skill], mistake_rate: float = 0.0) -> str:
    """One training line from a uniform mixture of ``skills``.

    ``mistake_rate`` is the chance, inside a skill's hard region, that the line
    shows the systematic mistake instead of the right answer.
    """
    skill = skills[rng.randrange(len(skills))]
    key = skill.sample_key(rng)
    wrong = skill.is_hard(key) and rng.random() < mistake_rate
    return skill.text(key, wrong=wrong)


def split_items(
    skill: Skill, rng: random.Random, n_per_split: int
) -> tuple[list[Item], list[Item]]:
    """Disjoint validation and test items drawn from a skill's inputs.

    Each split takes up to ``n_per_split / 2`` inputs from each region (easy and
    hard), and at most half of a region, so the splits never share an input:
    ``add`` has 55 easy and 45 hard inputs (27 + 22 per split); the sequence
    skills have 90 easy and 720 hard ones (45 + 100 per split at the default 200).
    """
    keys = skill.keys()
    easy = [k for k in keys if not skill.is_hard(k)]
    hard = [k for k in keys if skill.is_hard(k)]
    val_keys: list[Key] = []
    test_keys: list[Key] = []
    for pool in (easy, hard):
        # Up to half the split from each region, and at most half of the region.
        share = min(n_per_split // 2, len(pool) // 2)
        chosen = rng.sample(pool, 2 * share)
        val_keys += chosen[:share]
        test_keys += chosen[share:]
    rng.shuffle(val_keys)
    rng.shuffle(test_keys)
    return [skill.item(k, rng) for k in val_keys], [skill.item(k, rng) for k in test_keys]
