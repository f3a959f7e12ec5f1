"""Exact number parsing and the one tolerance rule every comparison shares.

Numbers are parsed to `Fraction` (never float) so "0.1 + 0.2"-style noise cannot creep in, and
the common case (both answers plain numbers) never needs sympy or a time limit.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

#: Relative tolerance for non-integer values: absorbs decimal rounding such as 0.333333 for 1/3.
REL_TOL = Fraction(1, 10**6)
#: Longest digit string turned into a number; longer ones are not treated as numbers at all.
MAX_DIGITS = 400

_MINUS = "-\u2212"  # ASCII hyphen and the Unicode minus sign

_GSM8K_RE = re.compile(
    r"""
    (?P<sign>[-\u2212+])?\s*
    (?:\\?\$|[\u20ac\u00a3\u00a5])?\s*          # currency: $ \$ euro pound yen
    (?P<sign2>[-\u2212])?
    (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
    (?P<exp>[eE][-+]?\d{1,3})?
    (?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?
    \s*(?P<pct>\\?%|percent\b)?
    (?:\s*[a-zA-Z][a-zA-Z\s/.]*)?               # unit words: "dollars", "km/h", "per hour"
    """,
    re.X,
)

_PLAIN_RE = re.compile(
    r"""(?P<sign>-)?(?:
        (?P<num>\d+(?:\.\d+)?|\.\d+)(?:/(?P<den>\d+))?
      | \\frac\{(?P<fnum>-?\d+(?:\.\d+)?)\}\{(?P<fden>-?\d+(?:\.\d+)?)\}
    )""",
    re.X,
)


def rounded(x: Fraction, decimals: int) -> Fraction:
    """x rounded half up to `decimals` places, exactly."""
    scale = Fraction(10) ** decimals
    return Fraction(math.floor(x * scale + Fraction(1, 2))) / scale


def numbers_close(x: Fraction, y: Fraction, decimals: int | None = None) -> bool:
    """Equal when identical; integers must match exactly, other values within REL_TOL.

    Integers are exact because a near-miss on a count (999999 vs 1000000) is a wrong answer;
    the tolerance only exists for decimal renderings of fractions and irrationals. When the
    question states a rounding (`decimals` places), values that round alike are equal too:
    0.33 is 1/3 and 2.6667 is 8/3 to 2 places.
    """
    if x == y:
        return True
    if decimals is not None and rounded(x, decimals) == rounded(y, decimals):
        return True
    if x.denominator == 1 or y.denominator == 1:
        return False
    return abs(x - y) <= REL_TOL * max(abs(x), abs(y))


def _decimal(text: str, exponent: str | None = None) -> Fraction | None:
    """Exact value of digits with an optional '.' (already validated by a regex) and e-power."""
    if len(text) > MAX_DIGITS:
        return None
    whole, _, frac = text.partition(".")
    value = Fraction(int(whole + frac or "0"), 10 ** len(frac)) if frac else Fraction(int(whole))
    if exponent:
        value *= Fraction(10) ** int(exponent[1:])
    return value


def gsm8k_values(text: str) -> tuple[Fraction, ...] | None:
    """Candidate values of a GSM8K-style answer, or None when it is not a single number.

    Accepts thousands commas, currency, a trailing period, unit words, a/b fractions, simple
    scientific notation, and 'x = 5' (the right-hand side). A percentage yields two candidates,
    its face value and value/100, so "50%" matches both "50" and "0.5".
    """
    s = text.strip()
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    s = s.rstrip(". ")
    m = _GSM8K_RE.fullmatch(s)
    if m is None:
        return None
    if m["sign"] and m["sign2"]:
        return None
    value = _decimal(m["num"].replace(",", ""), m["exp"])
    if value is None:
        return None
    if m["den"] is not None:
        den = _decimal(m["den"])
        if not den:
            return None
        value /= den
    sign = m["sign"] or m["sign2"]
    if sign is not None and sign in _MINUS:
        value = -value
    if m["pct"]:
        return (value, value / 100)
    return (value,)


def _signed(text: str) -> Fraction | None:
    value = _decimal(text.lstrip("-"))
    return -value if value is not None and text.startswith("-") else value


def plain_number(text: str) -> Fraction | None:
    """The value of an already-normalised MATH answer that is just a number (5, -0.5, 3/4,
    \\frac{1}{2}), else None: lets most wrong answers be rejected without sympy."""
    m = _PLAIN_RE.fullmatch(text)
    if m is None:
        return None
    if m["num"] is not None:
        value = _decimal(m["num"])
        if value is not None and m["den"] is not None:
            den = _decimal(m["den"])
            value = value / den if den else None
    else:
        num, den = _signed(m["fnum"]), _signed(m["fden"])
        value = num / den if num is not None and den else None
    if value is None:
        return None
    return -value if m["sign"] else value
