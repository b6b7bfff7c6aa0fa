"""A VLM's questions and the mapping of its free-text answers back to one class (``generate`` mode).

Shared by the annotator (``orchestrator/annotation/vlm.py``) and the methods that fine-tune it
(``trainables/vlm_lora.py``): a question is asked and an answer is read the same way in both.

Co-Reg (extended paper, section III) prompts LLaVA with templates that list every class name as a
choice and maps each answer to a class; the candidate set is the union over templates. The paper
does not say how an answer is matched, so the rules are written down here:

1. Text is compared in a normal form: lower case, every character that is not a letter or a digit
   becomes a space (punctuation, ``_``, ``-``, ``/``), and the articles ``a``, ``an``, ``the`` are
   dropped. A word of the answer matches a word of a class name when it is that word or a plural
   of it (``+s``, ``+es``, ``y`` -> ``ies``: ``trucks``, ``buses``, ``butterflies``).
2. A class is named when one of its aliases occurs in the answer as a run of whole words (extra
   words around it are allowed: "It is a cat." names ``cat``). Aliases of a class: its name, each
   ``/``-separated part of it (``T-shirt/top``: ``t shirt``, ``top``), and the name without the
   words every class name shares (``number 3`` -> ``3``; ``class 7`` -> ``7``).
3. A match inside a longer match of another class does not count (``t shirt`` names ``T-shirt``,
   not ``shirt``).
4. Only when no class is named, and only if the prompt labelled its choices (``{options}``): a
   leading choice label names that choice: a letter up to 26 classes, a 1-based number above
   (``B``, ``(b)``, ``B.``, ``Answer: B``, ``12)``); a lone letter must end the answer or be
   followed by ``.``, ``)`` or ``:`` ("I think..." is not choice I).
5. An answer that names no class, or more than one, is unparseable: :func:`parse_answer` returns
   None and the template adds nothing to the sample's candidate set. Nothing is guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

PARSER_VERSION = 1
"""Bump when a rule changes what an answer maps to (it is part of the annotation cache key)."""

ARTICLES = frozenset({"a", "an", "the"})
_NON_WORD = re.compile(r"[^0-9a-z]+")
_LEADING_CHOICE = re.compile(
    r"^\s*(?:(?:the\s+)?(?:answer|option|choice)\s*(?:is\s*|:\s*)?)?\(?([A-Za-z]|\d{1,3})\s*(?:[.):]|$)", re.IGNORECASE
)


def choice_label(i: int, num_classes: int) -> str:
    """The label of choice ``i`` in ``{options}``: letters A-Z up to 26 classes, else 1-based numbers."""
    return chr(ord("A") + i) if num_classes <= 26 else str(i + 1)


def same_word(token: str, word: str) -> bool:
    """``token`` of an answer is ``word`` of a class name, or a plural of it."""
    if token == word:
        return True
    if token in (word + "s", word + "es"):
        return True
    return len(word) > 1 and word.endswith("y") and token == word[:-1] + "ies"


def words(text: str) -> tuple[str, ...]:
    """The normal form of rule 1 as a tuple of words."""
    return tuple(w for w in _NON_WORD.split(text.lower()) if w and w not in ARTICLES)


@dataclass(frozen=True)
class AnswerParser:
    """Parses answers for one list of class names (built once per actor, used for every answer)."""

    class_names: tuple[str, ...]
    lettered: bool = False
    """The prompt listed the choices with labels (``{options}``): rule 4 applies."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_aliases", _aliases(self.class_names))

    def matches(self, answer: str) -> list[int]:
        """Every class the answer names (rules 1-3), in class order."""
        tokens = words(answer)
        spans: list[tuple[int, int, int]] = []  # (start, end, class)
        for c, aliases in enumerate(self._aliases):
            for alias in aliases:
                n = len(alias)
                spans += [
                    (i, i + n, c) for i in range(len(tokens) - n + 1)
                    if all(same_word(t, w) for t, w in zip(tokens[i : i + n], alias))
                ]  # fmt: skip
        kept = {
            c for s, e, c in spans
            if not any(c2 != c and s2 <= s and e <= e2 and (e2 - s2) > (e - s) for s2, e2, c2 in spans)
        }  # fmt: skip
        return sorted(kept)

    def __call__(self, answer: str) -> int | None:
        """The class ``answer`` names, or None when it names none or several (unparseable)."""
        found = self.matches(answer)
        if len(found) == 1:
            return found[0]
        if found or not self.lettered:
            return None
        return self._choice(answer)

    def _choice(self, answer: str) -> int | None:
        m = _LEADING_CHOICE.match(answer)
        if m is None:
            return None
        label, num = m.group(1), len(self.class_names)
        if label.isdigit():
            index = int(label) - 1
            return index if num > 26 and 0 <= index < num else None
        index = ord(label.upper()) - ord("A")
        return index if num <= 26 and index < num else None


def _aliases(class_names: Sequence[str]) -> list[list[tuple[str, ...]]]:
    """Rule 2's aliases of every class (empty or duplicate aliases dropped)."""
    split = [words(n) for n in class_names]
    shared = set.intersection(*(set(w) for w in split)) if len(split) > 1 else set()
    out = []
    for name, full in zip(class_names, split):
        aliases = [full, *(words(part) for part in name.split("/") if "/" in name)]
        aliases.append(tuple(w for w in full if w not in shared))
        out.append(list(dict.fromkeys(a for a in aliases if a)))
    return out


def parse_answer(answer: str, class_names: Sequence[str], lettered: bool = False) -> int | None:
    """One-off form of :class:`AnswerParser` (build the parser once when parsing many answers)."""
    return AnswerParser(tuple(class_names), lettered)(answer)


def fill_question(template: str, class_names: Sequence[str]) -> str:
    """The question of ``template`` (``{classes}``: the names comma-separated; ``{options}``: one
    labelled line per class) for these class names."""
    options = "\n".join(f"{choice_label(i, len(class_names))}. {n}" for i, n in enumerate(class_names))
    return template.format(classes=", ".join(class_names), options=options)


def is_lettered(template: str) -> bool:
    """The template labels its choices (answers may then be a choice label)."""
    return "{options}" in template
