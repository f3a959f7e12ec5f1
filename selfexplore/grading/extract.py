"""Pull the final answer out of a rationale.

Rationales in this project end with 'The answer is N'; GSM8K gold solutions end with '#### N';
MATH solutions and many models use \\boxed{...}. All three markers are recognised for both
tasks and the one that occurs LAST in the text wins, because models often restate or revise
earlier answers.
"""

from __future__ import annotations

import re

TASKS = ("gsm8k", "math")
#: Longest 'The answer is ...' / '#### ...' line segment read (real answers are far shorter).
MAX_SEGMENT_CHARS = 1000

_ANSWER_IS_RE = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b[ \t]*:?[ \t]*", re.I)
_HASHES_RE = re.compile(r"####[ \t]*")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BOXED_TOKEN_RE = re.compile(r"[ \t]+([^\s$]+)")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)
# What may stand between boxes that state one answer together ('\\boxed{1} and \\boxed{2}'):
# spacing, math delimiters, ',', ';', the words 'and' / 'or', and \\text{...} (which only occurs
# inside math, where Math-Verify joins every box of the span; docs/grading.md).
_BOX_GAP_RE = re.compile(
    r"(?:\s|[,;$~]|\\[()\[\]]|\\q?quad(?![a-zA-Z])|\\[,;: !]"
    r"|\\text\{[^{}]*\}|(?<![A-Za-z])(?:and|or)(?![A-Za-z]))*")
# A number as people write it: optional sign and currency, thousands commas, decimals,
# an optional /denominator and percent sign.
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>[-\u2212])?(?:\\?\$[ \t]*)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+)?"  # whole exponent: '1e999' must not grade as '1'
    r"(?P<frac>[ \t]*/[ \t]*\d+(?:\.\d+)?)?"
    r"(?P<pct>[ \t]*\\?%)?"
)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown grading task {task!r}; expected one of {TASKS}")


def _closing_braces(text: str) -> dict[int, int]:
    """Position of each closed '{' -> position of its '}', in one linear pass."""
    pairs: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _boxes(text: str, limit: int) -> list[tuple[int, int, str]]:
    """(start, end, content) of the complete, non-empty \\boxed{...} / \\fbox{...} groups (or
    \\boxed 5) that are not inside another one, in order, at most the last `limit`.
    Linear time: all braces are matched in one pass."""
    pairs = _closing_braces(text) if "{" in text else {}
    found: list[tuple[int, int, str]] = []
    inside_until = -1
    for m in _BOXED_RE.finditer(text):
        if m.start() < inside_until:  # a box inside the previous box belongs to it
            continue
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = pairs.get(j)
            if close is None:
                continue
            content, end = text[j + 1:close].strip(), close + 1
            inside_until = close
        else:
            token = _BOXED_TOKEN_RE.match(text, m.end())  # "\boxed 5"
            content, end = (token.group(1), token.end()) if token else ("", m.end())
        if content:
            found.append((m.start(), end, content))
    return found[-limit:]


def boxed_contents(text: str, limit: int = 64) -> list[tuple[int, str]]:
    """(position, content) of the outermost complete boxes, in order (see `_boxes`)."""
    return [(start, content) for start, _, content in _boxes(text, limit)]


def last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last complete \\boxed{...} / \\fbox{...} not inside another
    one (braces matched), or \\boxed 5; None when there is none."""
    boxes = boxed_contents(text, limit=1)
    return boxes[0] if boxes else None


def boxed_answer(text: str) -> tuple[int, str] | None:
    """(position, content) of the answer the last boxes state: the last box and the boxes just
    before it with only separators between (`_BOX_GAP_RE`), their contents joined by ', ', so
    '\\boxed{1} and \\boxed{-2}' states '1, -2' (a list: a set of solutions)."""
    boxes = _boxes(text, limit=64)
    if not boxes:
        return None
    first = len(boxes) - 1
    while first > 0 and _BOX_GAP_RE.fullmatch(text, boxes[first - 1][1], boxes[first][0]):
        first -= 1
    return boxes[first][0], ", ".join(content for _, _, content in boxes[first:])


def _first_number(segment: str) -> str | None:
    m = _NUMBER_RE.search(segment)
    if m is None:
        return None
    sign = "-" if m["sign"] else ""
    frac = (m["frac"] or "").replace(" ", "").replace("\t", "")
    pct = "%" if m["pct"] else ""
    return f"{sign}{m['num'].replace(',', '')}{m['exp'] or ''}{frac}{pct}"


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    return None if last is None else _first_number(last.group(0))


def _clean_math(segment: str) -> str:
    s = segment.strip()
    if s.startswith("$"):  # 'The answer is $5$ apples.' -> '5'
        end = s.find("$", 1)
        if end > 1:
            return s[1:end].strip()
    for _ in range(3):
        s = s.rstrip(" .").strip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        elif s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2].strip()
    return s


def _clean(segment: str, task: str) -> str | None:
    if task == "gsm8k":
        number = _first_number(segment)
        if number is not None:
            return number
        segment = segment.strip().rstrip(".").strip()
        return segment or None
    return _clean_math(segment) or None


def extract_answer(text: str | None, task: str = "gsm8k", *,
                   fallback_last_number: bool = False) -> str | None:
    """The final answer stated in `text`, or None.

    Markers: 'The answer is X' (also 'The final answer is'; X is the rest of that line),
    '#### X' and \\boxed{X} / \\fbox{X} / \\boxed X; the last marker in the text wins. For math,
    adjacent boxes separated only by ',', ';', 'and', 'or' or spacing are one answer, the list of
    their contents ('\\boxed{1} and \\boxed{2}' -> '1, 2').
    For gsm8k, X is reduced to its first number with commas and currency removed
    ("$1,000." -> "1000"; kept as text if it has no number); for math it is returned as LaTeX,
    minus $ delimiters and a final period ('$5$ apples' -> '5').

    `fallback_last_number` (default False) returns the last number in the text when no marker is
    found. It is off by default because a truncated or unfinished rationale whose last number
    happens to equal the gold answer must not count as correct (that would poison RFT data and
    first-pit search); turn it on for lenient evaluation of models not trained on this format.
    """
    _check_task(task)
    if not isinstance(text, str) or not text:
        return None
    candidates: list[tuple[int, str]] = []
    for regex in (_ANSWER_IS_RE, _HASHES_RE):
        for m in reversed(list(regex.finditer(text))):
            line_end = text.find("\n", m.end(), m.end() + MAX_SEGMENT_CHARS)
            segment = text[m.end():m.end() + MAX_SEGMENT_CHARS if line_end < 0 else line_end]
            value = _clean(segment, task)
            if value is not None:
                candidates.append((m.start(), value))
                break
    boxed = boxed_answer(text) if task == "math" else last_boxed(text)
    if boxed is not None:
        value = _clean(boxed[1], task)
        if value is not None:
            candidates.append((boxed[0], value))
    if candidates:
        return max(candidates)[1]
    return _last_number(text) if fallback_last_number else None
