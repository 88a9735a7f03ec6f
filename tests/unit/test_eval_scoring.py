"""The evaluation set's scorer: a right answer scores 1, a wrong one 0, under normalisation
(case, accents, punctuation, thousands separators); and the set itself is well formed."""

from __future__ import annotations

import pytest

from app.convert.evaluate import EvalError, Question, Target, load_eval_set, normalize, score


def question(check: str, *answers: str) -> Question:
    return Question("q", "kind", "?", answers, check)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("check", "answers", "reply", "expected"),
    [
        ("contains", ["Paris"], "The capital of France is Paris, France.", 1),
        ("contains", ["Paris"], "PARIS!", 1),
        ("contains", ["Paris"], "The capital of France is Lyon.", 0),
        ("contains", ["Paris"], "Parisian food is good.", 0),  # whole words only
        ("contains", ["carbon dioxide", "CO2"], "They take in CO2.", 1),
        ("contains", ["a, b, c"], "A,B,C.", 1),
        ("contains", ["7", "seven"], "There are seven days.", 1),
        ("contains", ["7"], "The Earth has 7,986,982 of them.", 0),  # one number, not 7
        ("contains", ["Bogota"], "Bogotá", 1),  # accents off
        ("number", ["5"], "2 + 3 = 5", 1),
        ("number", ["5"], "The answer is 5.", 1),
        ("number", ["42"], "12 + 30 = 32\n\n42 is what some say", 0),  # the first line's
        ("number", ["1000"], "It is 1,000.", 1),
        ("number", ["6"], "six", 0),
        ("number", ["6"], "6.0", 1),
        ("exact", ["yes"], "Yes.", 1),
        ("exact", ["yes"], "Yes, of course.", 0),
        ("exact_case", ["CAT"], "CAT", 1),
        ("exact_case", ["CAT"], "Cat", 0),
        ("exact_case", ["CAT"], ' "CAT". ', 1),
    ],
)
def test_score(check: str, answers: list[str], reply: str, expected: int) -> None:
    assert score(question(check, *answers), reply) == expected


def test_normalize() -> None:
    assert normalize("  Paris,   France! ") == "paris france"
    assert normalize("Twenty-Four") == "twenty four"
    assert normalize("Ça va") == "ca va"


def test_the_eval_set_is_well_formed_and_each_answer_scores_itself() -> None:
    eval_set = load_eval_set()
    assert eval_set.version >= 1
    ids = [q.id for q in eval_set.questions]
    assert len(ids) == len(set(ids)) >= 40
    assert {q.kind for q in eval_set.questions} == {
        "capitals", "arithmetic", "facts", "instructions"
    }  # fmt: skip
    for q in eval_set.questions:
        assert q.check in ("contains", "number", "exact", "exact_case")
        assert all(score(q, answer) == 1 for answer in q.answers), q.id
        assert score(q, "I do not know.") == 0, q.id
    assert len(eval_set.texts) >= 5


def test_targets_parse_or_say_what_is_wrong() -> None:
    target = Target.parse("int8=http://127.0.0.1:8000/,model=m,path=/models/x,key=k")
    assert (target.name, target.url, target.model, target.api_key) == (
        "int8", "http://127.0.0.1:8000", "m", "k"
    )  # fmt: skip
    assert Target.parse("fp32=https://h").model == "fp32"
    for bad in ("http://h", "x=ftp://h", "x=http://h,colour=red"):
        with pytest.raises(EvalError):
            Target.parse(bad)
