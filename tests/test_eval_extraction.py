import pytest

from storm_vlm.eval import extract_choice

OPTS = ["A. red ball", "B. red", "C. a blue cube", "D. the dog"]
PLAIN = ["red ball", "red", "a blue cube", "the dog"]


@pytest.mark.parametrize("reply,expected", [
    # the accepted forms
    ("(B)", 1), ("B.", 1), ("B", 1), ("b)", 1), ("[B]", 1), ("B:", 1), (" B \n", 1),
    ("The answer is B", 1), ("The answer is B.", 1), ("Answer: B", 1), ("answer: b.", 1),
    ("The best answer is (D).", 3), ("Best option: (D)", 3), ("The correct option is C, the cube.", 2),
    ("B. a blue cube", 1),  # letter and text disagree: the letter the prompt asked for decides
    ("B. red", 1), ("(C) a blue cube", 2), ("b) red", 1), ("B\nBecause the ball is red.", 1), ("**C**", 2),
    ("I think (C) fits best.", 2), ("It is probably C.", 2), ("The answer is A because it rolls", 0),
    # the option's text
    ("red ball", 0), ("Red ball.", 0), ("red", 1), ("The dog", 3), ("It shows a blue cube.", 2),
    # ambiguous or unmatched: None, never a guess
    ("", None), ("   ", None), ("I don't know", None), ("A man is running", None), ("B or C", None),
    ("The answer is B or C", None), ("Option A is wrong, option B is right", None),
    ("The answer is A dog", None), ("the answer is a dog", None), ("I see a red ball and the dog", None),
    ("E", None), ("The answer is F.", None),  # beyond the options
    ("(A) or (C)", None),
])
def test_extraction_table(reply, expected):
    assert extract_choice(reply, OPTS) == expected
    assert extract_choice(reply, PLAIN) == expected  # with or without "A. " prefixes


def test_article_a_is_not_option_a():
    opts = ["cat", "dog", "bird"]
    assert extract_choice("A dog runs across the yard.", opts) == 1  # the text names "dog"
    assert extract_choice("A small animal.", opts) is None
    assert extract_choice("A", opts) == 0 and extract_choice("A.", opts) == 0


def test_numbers_match_whole_words_only():
    opts = ["3", "13", "30"]
    assert extract_choice("13", opts) == 1
    assert extract_choice("There are 30 people.", opts) == 2
    assert extract_choice("Between 3 and 13.", opts) is None


@pytest.mark.parametrize("reply,expected", [
    ("C, since it is red", 2), ("A because it is red", 0), ("A, because the ball is red", 0),
    ("I would say B.", 1), ("I think B.", 1), ("C, D", None), ("A, B or C", None),
])
def test_a_leading_letter_before_its_reason_decides(reply, expected):
    assert extract_choice(reply, OPTS) == expected


def test_egoschema_c_the_camera_wearer_is_not_option_c():
    """EgoSchema's options call the camera wearer "C": a partial quote of an option names nothing."""
    opts = ["C is scrolling on the phone.", "C is cooking a meal.", "C cleans the kitchen counter.",
            "C reads a book on the sofa.", "C takes a break to drink from a cup and then washes it."]
    assert extract_choice("C takes a break to drink from a cup", opts) is None
    assert extract_choice("C is scrolling", opts) is None
    assert extract_choice("C is cooking a meal.", opts) == 1  # an option's whole text
    assert extract_choice("C", opts) == 2 and extract_choice("The answer is E.", opts) == 4
    assert extract_choice("E. C takes a break", opts) == 4


def test_two_options_and_yes_no():
    assert extract_choice("Yes.", ["yes", "no"]) == 0
    assert extract_choice("B", ["yes", "no"]) == 1
    assert extract_choice("C", ["yes", "no"]) is None
