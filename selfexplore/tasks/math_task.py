"""MATH: competition problems with LaTeX solutions whose answer is the last `\\boxed{...}`.

Records are JSONL with `problem`/`solution` (the original release) or `query`/`response`.
The gold answer is the content of the LAST `\\boxed{...}` (or `\\fbox{...}`), braces matched,
read as grading reads a model's answer (`selfexplore.grading.extract.last_boxed`: a box inside
another belongs to it, unclosed and empty boxes are passed over);
the trained-form solution is the original text followed by a final line
`The answer is <answer>`. (Module named `math_task` so it never shadows the stdlib `math`.)
"""

from __future__ import annotations

import re

from selfexplore.grading.extract import last_boxed
from selfexplore.tasks.base import ANSWER_LINE, ANSWER_PREFIX, JsonlTask

_BEGIN = re.compile(r"\\begin\s*\{([^{}]*)\}")
_END = re.compile(r"\\end\s*\{([^{}]*)\}")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_NEXT_WORD = re.compile(r"\s+(\S)")
_LIST_MARKER = re.compile(r"\(?(\d+|[A-Za-z]|[ivxIVX]+)\)?")


def split_latex_steps(text: str) -> list[str]:
    """Split a LaTeX solution into steps: at line breaks and sentence ends outside math mode.

    Math stays whole: `$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]` and any
    `\\begin{env}...\\end{env}` (align, equation, cases, ...) are never split, and neither is
    text inside braces (`\\textbf{...}`). A sentence ends at `.`, `!` or `?` followed by
    whitespace and then anything but a lowercase letter (so 'e.g. the' and '3.5' stay
    whole), except after a list marker such as '1.' or '(a)'. Steps are stripped; empty ones
    dropped. A blank line ends unclosed inline math and braces, as TeX itself would, so a
    malformed model output cannot swallow the rest of the text into one step.

    >>> split_latex_steps("We have $x = 1.5$. Then $2x = 3$.\\nSo the answer is $3$.")
    ['We have $x = 1.5$.', 'Then $2x = 3$.', 'So the answer is $3$.']
    >>> split_latex_steps("Hence\\n\\\\[a = b.\\nc = d.\\\\]\\nDone. Next, \\\\textbf{Note. Yes}.")
    ['Hence', '\\\\[a = b.\\nc = d.\\\\]', 'Done.', 'Next, \\\\textbf{Note. Yes}.']
    """
    steps: list[str] = []
    start = 0

    def cut(end: int) -> None:
        nonlocal start
        piece = text[start:end].strip()
        if piece:
            steps.append(piece)
        start = end

    i, n = 0, len(text)
    depth = 0  # brace depth in text mode
    close: str | None = None  # closing delimiter of the math we are in
    envs: list[str] = []  # open \begin{...} environments
    while i < n:
        c = text[i]
        if envs:
            if (m := _BEGIN.match(text, i)) is not None:
                envs.append(m.group(1))
                i = m.end()
            elif (m := _END.match(text, i)) is not None:
                envs.pop()
                i = m.end()
            else:
                i += 2 if c == "\\" else 1
            continue
        if close is not None:
            if text.startswith(close, i):
                i += len(close)
                close = None
            elif close in ("$", "\\)") and _BLANK_LINE.match(text, i):
                close = None  # unclosed inline math: let text mode cut at the blank line
            else:
                i += 2 if c == "\\" else 1
            continue
        if c == "\\":
            if (m := _BEGIN.match(text, i)) is not None:
                envs.append(m.group(1))
                i = m.end()
                continue
            if text.startswith("\\[", i) or text.startswith("\\(", i):
                close = "\\]" if text[i + 1] == "[" else "\\)"
            i += 2  # an escaped character (\$, \{) or the start of a command
            continue
        if c == "$":
            close = "$$" if text.startswith("$$", i) else "$"
            i += len(close)
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        elif c == "\n" and depth and _BLANK_LINE.match(text, i):
            depth = 0
        if depth == 0:
            if c == "\n":
                cut(i)
            elif c in ".!?" and _sentence_ends(text, i, start):
                cut(i + 1)
        i += 1
    cut(n)
    return steps


def _sentence_ends(text: str, i: int, start: int) -> bool:
    following = _NEXT_WORD.match(text, i + 1)
    if following is None or following.group(1).islower():
        return False
    return _LIST_MARKER.fullmatch(text[start:i].strip()) is None


class MathTask(JsonlTask):
    """MATH from JSONL files; steps from `split_latex_steps`, graded with symbolic equivalence.

    Gold answer: the last `\\boxed{...}`; a solution without one may instead end with a line
    'The answer is X' (already trained form). A final 'The answer is' line is replaced by one
    stating the boxed answer, so the trained form always ends with exactly one answer line.
    Option `lenient` as for GSM8K.
    """

    name = "math"
    grading_task = "math"
    layouts = (("problem", "solution"), ("query", "response"))

    def parse_solution(self, text: str) -> tuple[str, str]:
        lines = text.strip().split("\n")
        if not lines[0]:
            raise ValueError("empty solution")
        final = ANSWER_LINE.fullmatch(lines[-1])
        boxed = last_boxed(text)
        answer = None if boxed is None else boxed[1]
        if answer is None and final is not None:
            answer = final.group(1)
            if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
                answer = answer.strip("$")
        if answer is None:
            raise ValueError("no gold answer: no complete \\boxed{...} (nor a final "
                             "'The answer is ...' line)")
        answer = " ".join(answer.split())
        if not answer:
            raise ValueError("empty gold answer")
        body = "\n".join(lines[:-1] if final is not None else lines).rstrip()
        solution = f"{ANSWER_PREFIX} {answer}"
        return (f"{body}\n{solution}" if body else solution), answer

    def split_steps(self, text: str) -> list[str]:
        return split_latex_steps(text)
