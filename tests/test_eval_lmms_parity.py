"""What a researcher moving from lmms-eval compares: the letter read from a reply, the groups each
benchmark is reported by, and annotation files as the releases ship them."""

import json
import logging

import pytest

from storm_vlm.eval import extract_choice, load_benchmark, score
from storm_vlm.eval.records import Record

from test_eval_fixtures import Videos, make_longvideobench, make_mvbench

OPTS = ["A. red ball", "B. red", "C. a blue cube", "D. the dog"]


# Replies whose letter lmms-eval's VideoMME reader (first capital A-D after its answer prefixes are
# removed, or the ranked shared MCQ reader of later releases) and its MVBench reader (the lone letter
# word) agree on: the letter read here must be the same one.
@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B)", "B"), ("B:", "B"), ("[B]", "B"), (" B \n", "B"),
    ("The answer is B.", "B"), ("The best answer is B", "B"), ("Answer: B) red", "B"), ("Option B", "B"),
    ("Best option: (D)", "D"), ("Best option: (D) the dog", "D"), ("D. A book", "D"), ("C. a blue cube", "C"),
    ("B. a blue cube", "B"),
    ("B\nBecause the ball is red.", "B"), ("**B**", "B"), ("B.\n\nExplanation: A dog ...", "B"),
    ("The correct option is C, the cube.", "C"), ("C is correct", "C"), ("Correct answer: C", "C"),
    ("The answer is: (A)", "A"), ("A", "A"), ("A.", "A"), ("The answer is (B). The ball is red.", "B"),
    ("The best answer is:\nB", "B"), ("The video ends with C happening", "C"),
])
def test_the_letter_lmms_eval_reads_is_the_letter_read_here(reply, letter):
    assert extract_choice(reply, OPTS) == "ABCD".index(letter)


# Where lmms-eval takes the first capital letter of a hedge or an English article, a reply here
# names nothing and is counted wrong (unparsed); see docs/evaluation.md.
@pytest.mark.parametrize("reply", ["B or C", "The answer is B or C", "A B C D", "A man is running",
                                   "The answer is A dog", "Option A is wrong, option B is right",
                                   "I think (C) ... no, (D)", "", "   ", "E", "The answer is E."])
def test_hedges_articles_and_letters_beyond_the_options_name_nothing(reply):
    assert extract_choice(reply, OPTS) is None


def _videomme(i, duration, domain, sub, task, correct):
    rec = Record(id=f"q{i}", benchmark="videomme", video="v", question="q", options=("a", "b", "c", "d"),
                 answer=0, categories={"duration": duration, "domain": domain, "sub_category": sub,
                                       "task_type": task})
    return rec, {"id": rec.id, "status": "answered", "reply": "A" if correct else "B"}


def test_videomme_is_broken_down_by_duration_domain_sub_category_and_task_type():
    rows = [_videomme(0, "short", "Knowledge", "Astronomy", "OCR Problems", True),
            _videomme(1, "short", "Knowledge", "Law", "OCR Problems", False),
            _videomme(2, "long", "Knowledge", "Astronomy", "Counting Problem", True)]
    res = score("videomme", [r for r, _ in rows], {p["id"]: p for _, p in rows})
    b = res["breakdowns"]
    assert list(b) == ["duration", "domain", "sub_category", "task_type"]
    assert {k: (g["correct"], g["count"]) for k, g in b["sub_category"].items()} == {"Astronomy": (2, 2),
                                                                                   "Law": (0, 1)}
    assert b["duration"]["short"]["accuracy"] == 0.5 and res["accuracy"] == pytest.approx(2 / 3)


def test_an_absent_mvbench_task_file_is_named_in_a_warning(tmp_path, caplog):
    root = make_mvbench(tmp_path / "mv", Videos(tmp_path))
    with caplog.at_level(logging.WARNING, logger="storm_vlm.eval"):
        load_benchmark("mvbench", root)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "action_antonym.json" in warned and "covers only the 3 present" in warned
    assert "object_shuffle.json" not in warned  # present tasks are not named


def test_annotation_files_with_a_byte_order_mark_are_read(tmp_path):
    root = make_longvideobench(tmp_path / "lvb", Videos(tmp_path))
    path = root / "lvb_val.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r.id for r in load_benchmark("longvideobench", root)] == ["abc_0", "def_0"]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"not": "a list"}).encode())
    with pytest.raises(Exception, match="lvb_val.json: expected a JSON list"):
        load_benchmark("longvideobench", root)
