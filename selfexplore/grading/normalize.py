"""String normalisation of MATH answers (LaTeX), so that equal answers usually become equal
strings and the expensive symbolic check is the exception.

Callers cap the input length first (equiv.MAX_ANSWER_CHARS); no regex here backtracks badly.
"""

from __future__ import annotations

import functools
import re

from selfexplore.grading.extract import boxed_answer

_TEXT_CMDS = ("text", "textbf", "textit", "textrm", "textnormal", "mbox", "mathrm", "mathbf",
              "mathit", "rm", "bf")
_TEXT_RE = re.compile(r"\\(?:%s)\s*\{([^{}]*)\}" % "|".join(_TEXT_CMDS))
_UNIT_SUFFIX_RE = re.compile(r"\s*(?:\^\s*\{?\s*[23]\s*\}?|[\u00b2\u00b3])?\s*$")
_UNITS = (
    "units?|cm|centimeters?|centimetres?|mm|millimeters?|meters?|metres?|km|kilometers?|"
    "inches|inch|feet|foot|ft|yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|"
    "days?|weeks?|months?|years?|dollars?|cents?|degrees?|pounds?|lbs?|ounces?|oz|grams?|kg|"
    "kilograms?|liters?|litres?|ml|gallons?|percentage|percent|pct"
)
_UNIT_WORDS_RE = re.compile(
    r"(?<=[\d})])\s*(?:(?:square|sq\.?|cubic)\s*)?(?:%s)(?![a-zA-Z])\.?"
    r"(?:\^\{?[23]\}?|[\u00b2\u00b3])?\s*$" % _UNITS
)
_SPACING_RE = re.compile(r"(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])|~")
_SIZING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])")
_SIZING_DOT_RE = re.compile(r"\\(?:left|right)\s*\.")
_DEGREE_RE = re.compile(
    r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\u00b0|\\degree(?![a-zA-Z])")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CHOICE_RE = re.compile(r"\(([A-Ea-e])\)")
_DFRAC_RE = re.compile(r"\\[dtc]frac(?![a-zA-Z])")
# Relations become one character each (see relations.py), so that removing spaces around them
# leaves no command to terminate.
_RELATION_RE = re.compile(
    r"\\(leqslant|geqslant|leq|geq|le|ge|lt|gt|neq|ne|approx|in)(?![a-zA-Z])|<=|>=|!=")
_RELATION_CHAR = {"leqslant": "≤", "leq": "≤", "le": "≤", "<=": "≤", "geqslant": "≥",
                  "geq": "≥", "ge": "≥", ">=": "≥", "lt": "<", "gt": ">", "neq": "≠", "ne": "≠",
                  "!=": "≠", "approx": "≈", "in": "∈"}
# A doubled backslash before a command name (\\le) is an escaping slip for \le; not so in
# matrices, where \\ ends a row.
_DOUBLE_ESCAPE_RE = re.compile(r"\\\\(?=[a-zA-Z])")
_ELLIPSIS_RE = re.compile(r"\.\.\.|\\[lc]?dots(?![a-zA-Z])")
# 'and' / 'or' between answers are separators, like commas ('(11,7) or (7,11)').
_CONJUNCTION_RE = re.compile(r"(?<![A-Za-z\\])(?:and|or)(?![A-Za-z])")
_COMMAS_RE = re.compile(r",(?:,)+")
_DISPLAY_RE = re.compile(r"\\displaystyle(?![a-zA-Z])")
# Whitespace is dropped, except the one space that ends a command before a letter ('\pi r').
_SPACE_RE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])|\s+")
_SQRT_RE = re.compile(r"\\sqrt(\d)")
_FRAC_DIGITS_RE = re.compile(r"\\frac(\d)(\d)")
_FRAC_DIGIT_BRACE_RE = re.compile(r"\\frac(\d)\{")
_FRAC_BRACE_DIGIT_RE = re.compile(r"\\frac(\{[^{}]*\})(\d)")
_LEADING_DOT_RE = re.compile(r"(?<![\d}])\.(\d)")
_RATIO_RE = re.compile(r"(-?\d+)/(\d+)")
_CMD_TAIL_RE = re.compile(r"\\([a-zA-Z]+)$")


def _strip_trailing_text(s: str) -> str:
    """Drop units written as trailing \\text{...} groups after a value ('5\\text{ cm}^2' -> '5'),
    scanning from the end so the cost is linear."""
    while True:
        m = _UNIT_SUFFIX_RE.search(s, max(0, len(s) - 16))
        body = s[:m.start()] if m else s
        if not body.endswith("}"):
            return s
        depth, i = 0, len(body) - 1
        while i >= 0:
            if body[i] == "}":
                depth += 1
            elif body[i] == "{":
                depth -= 1
                if depth == 0:
                    break
            i -= 1
        if i < 0:
            return s
        head = body[:i].rstrip()
        cmd = _CMD_TAIL_RE.search(head[-16:])
        if cmd is None or cmd.group(1) not in _TEXT_CMDS:
            return s
        value = head[:len(head) - len(cmd.group(0))].rstrip()
        if not value or value.endswith(("{", "(", "[", ",", "=")):
            return s
        s = value


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{x} -> \\frac{1}{x}, \\frac{x}2 -> \\frac{x}{2}."""
    s = _FRAC_DIGITS_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_DIGIT_BRACE_RE.sub(r"\\frac{\1}{", s)
    return _FRAC_BRACE_DIGIT_RE.sub(r"\\frac\1{\2}", s)


@functools.lru_cache(maxsize=8192)
def normalize_math(answer: str) -> str:
    """A canonical string for a MATH answer.

    Takes the answer the last \\boxed{...} groups state when there are any (adjacent boxes are
    one comma-separated answer, see `extract.boxed_answer`). Removes $ and display delimiters,
    spacing commands, \\left/\\right, \\displaystyle, degree marks, percent signs and words,
    and trailing units (\\text{...} after a value, or common unit words); unwraps the remaining
    \\text{X}; maps \\dfrac, \\tfrac and \\cfrac to \\frac; writes each relation as one character
    (= < > ≤ ≥ ≠ ≈ ∈); reads 'and', 'or' and ';' between answers as commas; removes whitespace
    but the space that ends a command before a letter ('\\pi r'); fixes \\sqrt2 and \\frac12
    shorthands; '.5' -> '0.5'; drops trailing periods and commas, thousands commas in a lone
    number, and parentheses around a choice letter ('(B)' -> 'B').
    """
    boxed = boxed_answer(answer)
    s = boxed[1] if boxed else answer
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    if "\\begin" not in s:
        s = _DOUBLE_ESCAPE_RE.sub(r"\\", s)
    s = s.replace("\\!", "")
    s = _SPACING_RE.sub(" ", s)
    s = _SIZING_DOT_RE.sub("", s)
    s = _SIZING_RE.sub("", s)
    s = _DFRAC_RE.sub(r"\\frac", s)
    s = _DISPLAY_RE.sub("", s)
    s = _DEGREE_RE.sub("", s)
    s = _ELLIPSIS_RE.sub(r"\\dots ", s)  # so that stripping trailing periods keeps '1, 2, ...'
    s = _RELATION_RE.sub(lambda m: _RELATION_CHAR[m.group(1) or m.group(0)], s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".,").strip()
    s = _strip_trailing_text(s)
    for _ in range(3):
        s = _TEXT_RE.sub(r"\1", s)
    s = _UNIT_WORDS_RE.sub("", s)
    s = _CONJUNCTION_RE.sub(",", s)
    s = s.replace("\\emptyset", "\\varnothing")
    s = _SPACE_RE.sub(lambda m: f"{m.group(1)} " if m.group(1) else "", s).replace(";", ",")
    s = _COMMAS_RE.sub(",", s).strip(",").rstrip(".")
    s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    s = _fix_fracs(s)
    s = _LEADING_DOT_RE.sub(r"0.\1", s)
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    m = _RATIO_RE.fullmatch(s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    m = _CHOICE_RE.fullmatch(s)
    if m:
        s = m.group(1).upper()
    return s


def bracket_depth(s: str) -> int:
    """Deepest nesting of (), [] and {} in `s` (a cheap guard before any parsing)."""
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth -= 1
    return best

