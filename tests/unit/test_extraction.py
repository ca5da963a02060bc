"""Answer extraction and the two correctness metrics (official string rule, numeric)."""

from __future__ import annotations

import pytest

from ltscale.eval.extraction import extract_answer, numeric_correct, official_correct, parse_number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step 1: 2+3=5\n#### 5", "5"),
        ("so the total is\n#### 1,234", "1234"),  # commas removed
        ("#### 18.0", "18.0"),  # official rule keeps the format
        ("#### -7", "-7"),
        ("#### $5.", "$5."),  # official rule does not strip $ or a trailing period
        ("a # b ## c\n### 42", "42"),  # several '#': text after the LAST one
        ("### <thinking>4<thinking>2 ", "42"),  # <thinking> markers removed
        ("the answer is 42", "the answer is 42"),  # no '#': whole text, as the official code
        ("", ""),
        ("####", ""),
        ("#### 42</s>", "42"),  # trailing EOS-like token dropped
        ("#### 42<|eot_id|></s>  ", "42"),  # several, with whitespace
        ("#### 42 <|im_end|>", "42"),
        ("#### 4</s>2", "4</s>2"),  # only trailing ones
    ],
)
def test_extract_answer(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_custom_thinking_token() -> None:
    assert extract_answer("### <lat>7", thinking_token="<lat>") == "7"
    assert extract_answer("### <thinking>7", thinking_token="<lat>") == "<thinking>7"


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("18", "18", True),
        ("1234", "1,234", True),  # gold commas removed
        ("1,234", "1234", True),
        (" 18 ", "18", True),
        ("18.0", "18", False),  # the documented fragility of the official metric
        ("$18", "18", False),
        ("18.", "18", False),
        ("-3", "-3", True),
        ("", "", False),  # empty is never correct
        ("", "18", False),
    ],
)
def test_official_correct(pred: str, gold: str, expected: bool) -> None:
    assert official_correct(pred, gold) is expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("18", 18.0),
        ("18.0", 18.0),
        ("18.", 18.0),
        ("$18.50", 18.5),
        ("1,000", 1000.0),
        ("-3", -3.0),
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("\u22124", -4.0),  # Unicode minus
        (".5", 0.5),
        ("3/4", 0.75),
        ("3 / 4 cups", 0.75),
        ("1/0", None),
        ("x-3", 3.0),  # a hyphen inside a word is not a minus sign
        ("about 12 apples and 3 pears", 12.0),  # first number
        ("no number here", None),
        ("", None),
    ],
)
def test_parse_number(text: str, value: float | None) -> None:
    assert parse_number(text) == value


@pytest.mark.parametrize(
    ("pred", "gold", "expected"),
    [
        ("18.0", "18", True),
        ("18", "18.00", True),
        ("$18.", "18", True),
        ("1,000", "1000", True),
        ("1000", "1,000", True),
        ("-3", "-3", True),
        ("-3", "3", False),
        ("0.75", "3/4", True),
        ("0", "0", True),
        ("17.9999", "18", False),
        ("18 apples", "18", True),
        ("", "18", False),
        ("none", "18", False),
        ("yes", "yes", True),  # non-numeric gold: falls back to the official string rule
        ("no", "yes", False),
    ],
)
def test_numeric_correct(pred: str, gold: str, expected: bool) -> None:
    assert numeric_correct(pred, gold) is expected


def test_numeric_rel_tol() -> None:
    assert numeric_correct("100.00001", "100", rel_tol=1e-6)
    assert not numeric_correct("100.001", "100", rel_tol=1e-6)
    assert numeric_correct("100.001", "100", rel_tol=1e-3)


def test_pipeline_extract_then_score() -> None:
    text = "Step 1: 6*3=18 <thinking>\nThe final answer is:\n#### 18.0</s>"
    pred = extract_answer(text)
    assert pred == "18.0"
    assert not official_correct(pred, "18")
    assert numeric_correct(pred, "18")


@pytest.mark.parametrize(
    ("generated", "gold", "official", "numeric"),
    [
        ("## Step 1: 1000+234=1234\nThe final answer is:\n### 1,234", "1234", True, True),  # commas
        ("The final answer is:\n### $18", "18", False, True),  # dollar sign
        ("The final answer is:\n### 18.", "18", False, True),  # trailing period
        ("The final answer is:\n### -5", "-5", True, True),  # negative
        ("The final answer is:\n### -5", "5", False, False),  # sign matters
        ("The final answer is:\n### 18.0", "18", False, True),  # 18.0 vs 18
        ("The final answer is:\n### 3.50", "3.5", False, True),  # decimal trailing zero
        ("The final answer is:\n### 18.5", "18", False, False),  # a real decimal is not rounded
        ("## Step 1: item # 3 costs 4\n## Step 2: 4*2=8\n### 8", "8", True, True),  # several '#'
        ("#### 7 #### 8", "8", True, True),  # the LAST '#' wins, not the first
        ("<thinking><thinking>\n### 1,250.50.", "1250.5", False, True),
        ("The answer is 42 and no hash", "42", False, True),  # official needs '#'
        ("### 42<|im_end|>", "42", True, True),  # SmolLM2's end-of-turn leaking into the text
    ],
)
def test_tricky_generations_end_to_end(generated: str, gold: str, official: bool, numeric: bool) -> None:
    pred = extract_answer(generated)
    assert official_correct(pred, gold) is official
    assert numeric_correct(pred, gold) is numeric
