"""The generate mode's answer parser on hand-written answers, and the sets and votes derived from
parsed answers (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from trainables.common.answers import AnswerParser, parse_answer, same_word, words
from orchestrator.annotation.vlm_stage import plurality, union_candidates

CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGITS = tuple(f"number {d}" for d in range(10))
TREES = ("maple_tree", "oak_tree", "palm_tree", "butterfly", "bus", "glass")


@pytest.mark.parametrize(
    "answer, classes, lettered, expected",
    [
        ("cat", CIFAR, False, 3),
        ("Cat.", CIFAR, False, 3),
        ("  CAT  ", CIFAR, False, 3),
        ("A cat", CIFAR, False, 3),
        ("The image shows a small dog sitting on grass.", CIFAR, False, 5),
        ("trucks", CIFAR, False, 9),
        ("Two horses!", CIFAR, False, 7),
        ("It is an airplane", CIFAR, False, 0),
        ("automobile", CIFAR, False, 1),
        ("cat or dog", CIFAR, False, None),  # names two classes: ambiguous
        ("It is not a dog, it is a cat", CIFAR, False, None),  # negation is not understood: ambiguous
        ("I don't know", CIFAR, False, None),  # names none
        ("", CIFAR, False, None),
        ("a tiger", CIFAR, False, None),
        ("catapult", CIFAR, False, None),  # whole words only
        ("B", CIFAR, False, None),  # unlabelled choices: a letter means nothing
        ("B", CIFAR, True, 1),
        ("(d)", CIFAR, True, 3),
        ("D.", CIFAR, True, 3),
        ("Answer: C", CIFAR, True, 2),
        ("The answer is E", CIFAR, True, 4),
        ("B. cat", CIFAR, True, 3),  # a named class wins over the letter
        ("Z", CIFAR, True, None),  # no 26th choice among 10
        ("I think so", CIFAR, True, None),  # "I" followed by a word is not choice I
        ("7", CIFAR, True, None),  # numbers label choices only above 26 classes
        ("T-shirt", FASHION, False, 0),  # not "shirt": the shorter match lies inside the longer one
        ("a t shirt", FASHION, False, 0),
        ("top", FASHION, False, 0),  # a /-separated part of the name
        ("shirt", FASHION, False, 6),
        ("ankle boots", FASHION, False, 9),
        ("boot", FASHION, False, None),  # part of a name is not the name
        ("sneakers", FASHION, False, 7),
        ("3", DIGITS, False, 3),  # the words every class shares ("number") may be left out
        ("Number 7.", DIGITS, False, 7),
        ("the number seven", DIGITS, False, None),
        ("3 or 8", DIGITS, False, None),
        ("oak tree", TREES, False, 1),
        ("oak_tree", TREES, False, 1),
        ("a tree", TREES, False, None),
        ("butterflies", TREES, False, 3),
        ("buses", TREES, False, 4),
        ("glasses", TREES, False, 5),
        ("houses", ("house", "mouse"), False, 0),
        ("a maple tree and a palm tree", TREES, False, None),
    ],
)
def test_parser_on_hand_written_answers(answer, classes, lettered, expected):
    assert parse_answer(answer, classes, lettered) == expected


def test_numbered_choices_above_26_classes():
    names = tuple(f"kind{i}" for i in range(30))
    parser = AnswerParser(names, lettered=True)
    assert parser("12)") == 11 and parser("30.") == 29 and parser("31") is None and parser("B") is None


def test_normal_form_and_plurals():
    assert words("The Trucks, and a BUS!") == ("trucks", "and", "bus")
    assert same_word("buses", "bus") and same_word("houses", "house") and same_word("flies", "fly")
    assert not same_word("bu", "bus") and not same_word("cats", "cat_")


def test_union_of_parsed_answers_and_no_answer_rows():
    answers = np.array([[1, 1, -1], [0, 2, 2], [-1, -1, -1]], dtype=np.int16)
    cand = union_candidates(answers, 4)
    assert cand.tolist() == [
        [False, True, False, False],
        [True, False, True, False],
        [True, True, True, True],  # nothing parsed: no information, every class
    ]


def test_plurality_vote_refuses_ties_and_empty_rows():
    answers = np.array([[1, 1, 2], [0, 2, -1], [-1, -1, -1], [3, -1, -1]], dtype=np.int16)
    assert plurality(answers, 4).tolist() == [1, -1, -1, 3]


def test_unparseable_answers_are_reported_per_template(capsys):
    from orchestrator.annotation.vlm_stage import report_unparseable
    from orchestrator.config import VlmAnnotatorSpec

    stats = {"unparseable_rate": 0.25, "unparseable_rate_t0": 0.5, "unparseable_rate_t1": 0.0}
    sample = [{"template": 0, "index": 3, "answer": "cat or dog", "parsed": -1}, {"template": 1, "index": 0, "answer": "dog", "parsed": 5}]
    report_unparseable(VlmAnnotatorSpec(kind="vlm", name="llava"), stats, sample)
    assert capsys.readouterr().out.splitlines() == [
        "[vlm llava] template 0: 50.0% of answers unparseable (ignored), e.g. 'cat or dog'"
    ]
