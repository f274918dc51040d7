"""Multiple-choice questions: how they are asked (`format_question`) and how a reply is read
(`extract_choice`). Evaluation, serving and the demo all go through these two functions.

The question text sent with the video (the video comes first in the user turn):

    {question}
    A. {option 0}
    B. {option 1}
    ...
    Answer with the option's letter from the given choices directly.

Style "mvbench" keeps that release's framing (as lmms-eval's mvbench task does):
"Question: {question}\nOptions:\n(A) {option 0}\n...". Options are lettered A, B, C, ... in the
order given; letter prefixes that came with them ("A. ...") are replaced, never doubled.

``extract_choice(text, options)`` returns the 0-based index of the option the reply
names, or None when it names none or more than one. None is counted wrong and logged
by the runner: there is never a random guess. The rules, tried in order:

1. The reply (or its first line) is just a letter: "B", "(B)", "B.", "b)", "[B]", "B:".
2. The reply starts with a lettered option: "B. Apples", "(B) apples", "b) apples", "C, since
   ...", "C because ...". The letter decides, as the prompt asks for it (and as lmms-eval reads
   it), even when the text after it is another option's.
3. An answer phrase names a letter: "The answer is B", "Answer: (C)", "Best option: D.",
   "the correct choice is b.". A letter the reply gives as its answer ("answer ...", "option is
   ...", "option: ...") decides over options it only discusses, as Video-MME's reader reads the
   letter after "The answer is": "The answer is B. Option A is wrong" is B. Different letters
   given or discussed so ("option A ... option C"), or "B or C", give None.
4. Exactly one distinct letter in parentheses anywhere: "I think (C) fits".
5. The option's text: the reply equals one option's text, or contains exactly one option's
   text as whole words (an option contained in another matching option is ignored, so
   "red ball" beats "red").
6. In a short reply (at most 10 words), exactly one distinct standalone capital letter:
   "Probably C, the cup", "I would say B.". A letter the options themselves use as a word is
   not counted here: EgoSchema calls the camera wearer "C" ("C picks up a cup"), so a reply
   quoting part of an option is not option C (an article "A dog ..." in an option hides no
   letter: "A and C" names two).

A letter beyond the number of options gives None. The capital "A" (or "I") followed by a
lowercase word is read as the English article (or pronoun), not an option — "A man is
running" names nothing — unless the word is a connective such as "because" ("I would"
stays the pronoun). Lowercase
letters count only where nothing else could be meant ("b)", "answer: b.").
"""

from __future__ import annotations

import re
import string
from typing import Sequence

__all__ = ["LETTERS", "POST_PROMPT", "STYLES", "strip_letter", "format_question", "extract_choice"]

LETTERS = string.ascii_uppercase
POST_PROMPT = "Answer with the option's letter from the given choices directly."
# style -> (template, option line)
STYLES: dict[str, tuple[str, str]] = {
    "default": ("{question}\n{options}\n" + POST_PROMPT, "{letter}. {text}"),
    "mvbench": ("Question: {question}\nOptions:\n{options}\n" + POST_PROMPT, "({letter}) {text}"),
}
_PREFIX = re.compile(r"\s*[\(\[]?([A-Za-z])\s*[\.\)\]:](?:\s+|$)")


def strip_letter(option: str, index: int) -> str:
    """"B. Apples" -> "Apples" when the prefix letter is this option's own letter."""
    m = _PREFIX.match(option)
    if m and m.group(1).upper() == LETTERS[index]:
        return option[m.end():].strip()
    return option.strip()


def format_question(question: str, options: Sequence[str], style: str = "default") -> str:
    """The user text (without the video) asking `question` with lettered `options` (see above)."""
    template, line = STYLES[style]
    lines = "\n".join(line.format(letter=LETTERS[i], text=strip_letter(t, i)) for i, t in enumerate(options))
    return template.format(question=question, options=lines)


_ALONE = re.compile(r"[\(\[]?([A-Za-z])[\)\]]?[\.\):]?")
_LEADING = re.compile(r"(?:[\(\[]([A-Za-z])[\)\]]|([A-Za-z])[\.\):,])(?=\s|$)|([A-Z])(?=\s+(?:because|since)\b)")
_PHRASE = re.compile(
    r"\b(answer|option|choice)\b\s*((?:is|would be|should be|will be|=)?\s*:?)\s*"
    r"(?:option\s*|choice\s*)?:?\s*([\(\[])?([A-Za-z])([\)\]])?(?![A-Za-z0-9'])",
    re.IGNORECASE,
)
_PAREN = re.compile(r"[\(\[]([A-Z])[\)\]]")
_CAPITAL = re.compile(r"(?<![A-Za-z0-9'\-])([A-Z])(?![A-Za-z0-9'\-])")
_OR = re.compile(r"\s*(?:or|and|/|,)\s*[\(\[]?[A-Z][\)\]]?(?![A-Za-z])")
_CONNECTIVES = {"because", "since", "as", "is", "was", "would", "should", "seems", "fits", "matches", "and", "or"}
_PRONOUN_I = {"was", "would", "should", "as"}  # "I would ..." is the pronoun, "I is ..." the letter
_NONWORD = re.compile(r"[^0-9a-z]+")


def _norm(s: str) -> str:
    return " ".join(_NONWORD.sub(" ", s.lower()).split())


def _index(letter: str, n: int) -> int | None:
    i = LETTERS.find(letter.upper())
    return i if 0 <= i < n else None


def _article_like(text: str, end: int, letter: str) -> bool:
    """True when capital A/I at text[:end] reads as an English word ("A man ...")."""
    if letter not in "AI":
        return False
    m = re.match(r"\s+([a-z][a-z']*)", text[end:])
    return bool(m) and (m.group(1) not in _CONNECTIVES or (letter == "I" and m.group(1) in _PRONOUN_I))


def _by_text(reply: str, texts: list[str]) -> int | None:
    r = _norm(reply)
    normed = [_norm(t) for t in texts]
    exact = [i for i, t in enumerate(normed) if t and t == r]
    if len(exact) == 1:
        return exact[0]
    if exact:
        return None
    padded = f" {r} "
    hits = [i for i, t in enumerate(normed) if t and f" {t} " in padded]
    hits = [i for i in hits if not any(j != i and normed[i] != normed[j] and f" {normed[i]} " in f" {normed[j]} "
                                       for j in hits)]
    return hits[0] if len(hits) == 1 else None


def extract_choice(text: str, options: Sequence[str]) -> int | None:
    """The 0-based index of the option `text` names, or None (see the module docstring).

    `options` are as the benchmark gives them, with or without "A. " prefixes.
    """
    n = len(options)
    if not isinstance(text, str) or n == 0:
        return None
    texts = [strip_letter(o, i) for i, o in enumerate(options)]
    s = text.replace("*", "").replace("`", "").strip().strip("\"'").strip()
    if not s:
        return None

    # 1. just a letter (the whole reply or its first line)
    first_line = s.splitlines()[0].strip()
    for candidate in (s, first_line):
        m = _ALONE.fullmatch(candidate)
        if m:
            return _index(m.group(1), n)

    # 2. a leading lettered option
    m = _LEADING.match(s)
    if m:
        letter = m.group(1) or m.group(2) or m.group(3)
        if _OR.match(s[m.end() - m.group(0).endswith(","):]):  # "B or C", "C, D": a list names no one option
            return None
        return _index(letter, n)

    # 3. an answer phrase: the letters given as the answer, else those discussed
    named, given = [], []
    for m in _PHRASE.finditer(s):
        word, says, opened, letter, closed = m.groups()
        wrapped = bool(opened and closed)
        after = s[m.end():]
        if letter.islower() and not wrapped and not re.match(r"\s*(?:[\.\):;,]|$)", after):
            continue
        if not wrapped and _article_like(s, m.end(), letter):
            continue
        if _OR.match(after):
            return None
        named.append(letter.upper())
        if word.lower() == "answer" or says.strip():
            given.append(letter.upper())
    named = given or named
    if named:
        if len(set(named)) > 1:
            return None
        return _index(named[0], n)

    # 4. one distinct letter in parentheses
    paren = {m.group(1) for m in _PAREN.finditer(s)}
    if len(paren) == 1:
        return _index(paren.pop(), n)
    if len(paren) > 1:
        return None

    # 5. the option's text
    i = _by_text(s, texts)
    if i is not None:
        return i

    # 6. one standalone capital letter in a short reply
    if len(s.split()) <= 10:
        words = {m.group(1) for t in texts for m in _CAPITAL.finditer(t)  # letters the options use as words
                 if not _article_like(t, m.end(), m.group(1))}
        caps = {m.group(1) for m in _CAPITAL.finditer(s)
                if not _article_like(s, m.end(), m.group(1)) and m.group(1) not in words}
        if len(caps) == 1:
            return _index(caps.pop(), n)
    return None
