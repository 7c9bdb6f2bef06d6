"""The demo task: worked steps are right, answers parse, and the held-out split never meets training."""

from models.task import Problem, held_out_problems, is_correct, is_test_question, parse_answer, sample_problems


def test_prototype_format():
    p = Problem((7, 5, 3, 8), ("+", "-", "+"))
    assert p.text == "Q:7+5-3+8 A:7+5=12;12-3=9;9+8=17 #17"
    assert p.prompt == "Q:7+5-3+8 A:" and p.answer == 17


def test_left_to_right_and_negative():
    p = Problem((1, 9, 2, 5), ("-", "-", "+"))
    assert p.solution == "1-9=-8;-8-2=-10;-10+5=-5 #-5"
    assert parse_answer(p.solution) == -5


def test_solutions_are_consistent():
    for p in sample_problems(300, "train", seed=3):
        assert is_correct(p, p.solution)
        assert len(p.operators) in (3, 4) and all(0 <= d <= 9 for d in p.operands)


def test_held_out_split_is_disjoint_and_fixed():
    test_qs = {p.question for p in held_out_problems(500)}
    assert len(test_qs) == 500 and all(is_test_question(q) for q in test_qs)
    train_qs = {p.question for p in sample_problems(20000, "train", seed=1)}
    assert not test_qs & train_qs
    assert [p.question for p in held_out_problems(20)] == [p.question for p in held_out_problems(20)]


def test_parse_answer_missing():
    assert parse_answer("7+5=12;") is None
