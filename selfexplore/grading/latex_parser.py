"""A small tokenizer and recursive-descent parser from answer LaTeX / plain math to sympy.

Why not sympy's `parse_latex`: it does not eval either (its ANTLR and Lark backends build
sympy objects from a parse tree; only `sympify`/`parse_expr` eval, and those are never used),
but measured on the regression corpus (docs/grading.md) its Lark grammar, given this module's
guards, agreed less with the source graders, missed 13 equivalences of tests/test_grading*.py
(it reads \\pi, e and i as plain symbols and words as products) and its Earley parser made the
slowest call about 40x slower; the ANTLR backend needs a pinned antlr4 runtime. This grammar only
ever constructs sympy objects (Integer, Rational, Symbol, Add, Mul, Pow, functions), and it
refuses, with ParseError, every step whose evaluation could explode: long literals, huge powers
and factorials, deep nesting, too many tokens. The symbolic stage still runs under a hard time
limit; these guards keep it cheap.

Grammar (loosely): numbers; single-letter variables with optional subscripts (x_1, a_{n});
Greek letters; + - * / ^ ! and implicit multiplication; ( ) { } grouping; |x|; \\frac,
\\sqrt[n]{}, \\binom; \\pi, \\infty, e (Euler's number) and i (imaginary unit); \\cdot \\times
\\div; \\sin \\cos \\tan \\cot \\sec \\csc \\arcsin \\arccos \\arctan \\sinh \\cosh \\tanh \\exp
\\ln \\log (natural log, \\log_b for base b), with powers such as \\sin^2 x and
\\sin^{-1} x = \\arcsin x. Plain-text forms
(sqrt(2), pi, sin x) work too. Three or more letters in a row that are not a function name are
taken for a word, not a product, so 'dog' and 'god' are never declared equal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sympy

from selfexplore.grading.numbers import MAX_DIGITS

#: Most tokens in one scalar answer.
MAX_TOKENS = 400
#: Deepest nesting of groups, signs and exponents.
MAX_DEPTH = 40
#: Largest exact rational built (bits of numerator or denominator, about 6000 digits).
MAX_BITS = 20_000
#: Largest |exponent| on a non-rational base, and largest root index.
MAX_EXPONENT = 1000
#: Largest integer whose factorial (or binomial top) is computed.
MAX_FACTORIAL = 2000


class ParseError(ValueError):
    """Text outside the grammar, or an expression too large to build safely."""


@dataclass(frozen=True)
class Token:
    """kind: 'num' (digits), 'var' (one letter), 'name' (command or function), 'op' (symbol)."""

    kind: str
    text: str


_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot,
    "sec": sympy.sec, "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos,
    "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh,
    "exp": sympy.exp, "ln": sympy.log, "log": sympy.log,
}
_INVERSE = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}
GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu "
    "nu xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma "
    "Upsilon Phi Psi Omega".split())
_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
_MUL = frozenset({"cdot", "times", "ast"})
_DIV = frozenset({"div"})
_FRAC = frozenset({"frac", "dfrac", "tfrac", "cfrac"})
_BINOM = frozenset({"binom", "dbinom", "tbinom"})
_IGNORED = frozenset({"left", "right", "displaystyle"})
_COMMANDS = (frozenset(_FUNCTIONS) | GREEK | frozenset(_CONSTANTS) | _MUL | _DIV | _FRAC
             | _BINOM | _IGNORED | {"sqrt"})
# Names recognised inside plain letter runs, longest first so 'arcsin' beats 'sin'.
_PLAIN_NAMES = tuple(sorted(set(_FUNCTIONS) | {"sqrt", "pi"}, key=len, reverse=True))
_UNICODE = {
    "\u03c0": (Token("name", "pi"),), "\u221e": (Token("name", "infty"),),
    "\u221a": (Token("name", "sqrt"),), "\u00d7": (Token("op", "*"),),
    "\u00b7": (Token("op", "*"),), "\u22c5": (Token("op", "*"),), "\u00f7": (Token("op", "/"),),
    "\u2212": (Token("op", "-"),), "\u00b2": (Token("op", "^"), Token("num", "2")),
    "\u00b3": (Token("op", "^"), Token("num", "3")),
}
_OPS = frozenset("+-*/^_()[]{}!|,=")
_NUM_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")
_CMD_RE = re.compile(r"\\([a-zA-Z]+)")


def _split_word(word: str) -> list[Token]:
    """A run of plain letters: function names, else one variable per letter ('2xy' is 2*x*y)."""
    out: list[Token] = []
    j = run = 0
    while j < len(word):
        name = next((p for p in _PLAIN_NAMES if word.startswith(p, j)), None)
        if name is not None:
            out.append(Token("name", name))
            j += len(name)
            run = 0
            continue
        out.append(Token("var", word[j]))
        j += 1
        run += 1
        if run >= 3:
            raise ParseError(f"{word!r} looks like a word, not math")
    return out


def tokenize(text: str) -> list[Token]:
    """Tokens of `text` (normalisation keeps the space that ends a command: '\\pi r')."""
    toks: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        if len(toks) > MAX_TOKENS:
            raise ParseError("too many tokens")
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9" or (c == "." and text[i + 1:i + 2].isdigit()):
            m = _NUM_RE.match(text, i)
            if m is None:
                raise ParseError(f"bad number at {i}")
            toks.append(Token("num", m.group()))
            i = m.end()
        elif c == "\\":
            m = _CMD_RE.match(text, i)
            if m is None:
                if text[i + 1:i + 2] in (" ", ",", ";", ":", "!"):
                    i += 2
                    continue
                raise ParseError(f"unsupported escape {text[i:i + 2]!r}")
            name = m.group(1)
            if name not in _COMMANDS:
                raise ParseError(f"unsupported command \\{name}")
            if name not in _IGNORED:
                toks.append(Token("name", name))
            i += 1 + len(name)
        elif c.isascii() and c.isalpha():
            j = i
            while j < n and text[j].isascii() and text[j].isalpha():
                j += 1
            toks.extend(_split_word(text[i:j]))
            i = j
        elif c in _OPS:
            toks.append(Token("op", c))
            i += 1
        elif c in _UNICODE:
            toks.extend(_UNICODE[c])
            i += 1
        else:
            raise ParseError(f"unexpected character {c!r}")
    return toks


# ---- guarded constructors --------------------------------------------------------------------

def _bits(r: sympy.Rational) -> int:
    return max(abs(int(r.p)).bit_length(), int(r.q).bit_length())


def _checked(e: sympy.Basic) -> sympy.Basic:
    if e.is_Rational and _bits(e) > MAX_BITS:
        raise ParseError("number too large")
    return e


def _number(text: str) -> sympy.Rational:
    if len(text) > MAX_DIGITS:
        raise ParseError("number literal too long")
    whole, _, frac = text.partition(".")
    return sympy.Rational(int(whole + frac or "0"), 10 ** len(frac))


def _add(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return _checked(sympy.Add(a, b))


def _mul(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return _checked(sympy.Mul(a, b))


def _neg(a: sympy.Basic) -> sympy.Basic:
    return _mul(sympy.Integer(-1), a)


def _pow(base: sympy.Basic, exp: sympy.Basic) -> sympy.Basic:
    """base**exp, refused when the evaluated result would be huge (10^{10^{10}} and the like)."""
    trivial_base = base.is_Rational and abs(base.p) <= 1 and base.q == 1
    if exp.is_Rational:
        if exp.q > MAX_EXPONENT:
            raise ParseError("root index too large")
        if base.is_Rational:
            if not trivial_base and abs(exp) * _bits(base) > MAX_BITS:
                raise ParseError("power too large")
        elif abs(exp) > MAX_EXPONENT:
            raise ParseError("exponent too large")
    elif exp.is_number:
        value = sympy.N(exp, 15)
        try:
            size = abs(complex(value))
        except (TypeError, OverflowError) as err:
            raise ParseError("exponent not a finite number") from err
        if size > MAX_EXPONENT:
            raise ParseError("exponent too large")
    return _checked(sympy.Pow(base, exp))


def _div(a: sympy.Basic, b: sympy.Basic) -> sympy.Basic:
    return _mul(a, _pow(b, sympy.Integer(-1)))


def _factorial(n: sympy.Basic) -> sympy.Basic:
    if n.is_Integer and not 0 <= n <= MAX_FACTORIAL:
        raise ParseError("factorial out of range")
    return _checked(sympy.factorial(n))


def _binomial(n: sympy.Basic, k: sympy.Basic) -> sympy.Basic:
    if n.is_Integer and abs(n) > MAX_FACTORIAL:
        raise ParseError("binomial too large")
    return _checked(sympy.binomial(n, k))


# ---- parser -----------------------------------------------------------------------------------

class _Parser:
    def __init__(self, toks: list[Token]) -> None:
        self.toks = toks
        self.pos = 0
        self.depth = 0
        self.abs_depth = 0

    def peek(self) -> Token | None:
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self) -> Token:
        t = self.peek()
        if t is None:
            raise ParseError("unexpected end")
        self.pos += 1
        return t

    def at_op(self, text: str) -> bool:
        t = self.peek()
        return t is not None and t.kind == "op" and t.text == text

    def expect(self, text: str) -> None:
        if not self.at_op(text):
            raise ParseError(f"expected {text!r}")
        self.pos += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError("nested too deeply")

    def starts_operand(self, t: Token) -> bool:
        if t.kind in ("num", "var"):
            return True
        if t.kind == "name":
            return t.text not in _MUL and t.text not in _DIV
        return t.text in "({" or (t.text == "|" and self.abs_depth == 0)

    def parse(self) -> sympy.Basic:
        e = self.expr()
        if self.pos != len(self.toks):
            raise ParseError(f"unexpected {self.toks[self.pos].text!r}")
        return e

    def expr(self) -> sympy.Basic:
        self.enter()
        left = self.term()
        while self.at_op("+") or self.at_op("-"):
            op = self.take().text
            right = self.term()
            left = _add(left, right if op == "+" else _neg(right))
        self.depth -= 1
        return left

    def term(self) -> sympy.Basic:
        left = self.factor()
        while (t := self.peek()) is not None:
            if (t.kind == "op" and t.text == "*") or (t.kind == "name" and t.text in _MUL):
                self.take()
                left = _mul(left, self.factor())
            elif (t.kind == "op" and t.text == "/") or (t.kind == "name" and t.text in _DIV):
                self.take()
                left = _div(left, self.factor())
            elif self.starts_operand(t):
                if t.kind == "num":
                    raise ParseError("number right after a value")
                left = _mul(left, self.power())
            else:
                break
        return left

    def factor(self) -> sympy.Basic:
        if self.at_op("-") or self.at_op("+"):
            sign = self.take().text
            self.enter()
            inner = self.factor()
            self.depth -= 1
            return _neg(inner) if sign == "-" else inner
        return self.power()

    def power(self) -> sympy.Basic:
        base = self.postfix()
        if self.at_op("^"):
            self.take()
            return _pow(base, self.exponent())
        return base

    def exponent(self) -> sympy.Basic:
        """Right-associative; a whole digit run counts ('2^10' is 1024, as in plain text)."""
        self.enter()
        if self.at_op("-") or self.at_op("+"):
            sign = self.take().text
            e = self.exponent()
            e = _neg(e) if sign == "-" else e
        else:
            e = self.postfix()
            if self.at_op("^"):
                self.take()
                e = _pow(e, self.exponent())
        self.depth -= 1
        return e

    def postfix(self) -> sympy.Basic:
        e = self.primary()
        while self.at_op("!"):
            self.take()
            e = _factorial(e)
        return e

    def primary(self) -> sympy.Basic:
        t = self.take()
        if t.kind == "num":
            return _number(t.text)
        if t.kind == "var":
            return self.variable(t.text)
        if t.kind == "op":
            if t.text in "({":
                e = self.expr()
                self.expect(")" if t.text == "(" else "}")
                return e
            if t.text == "|":
                self.abs_depth += 1
                e = self.expr()
                self.expect("|")
                self.abs_depth -= 1
                return sympy.Abs(e)
            raise ParseError(f"unexpected {t.text!r}")
        name = t.text
        if name in _CONSTANTS:
            return _CONSTANTS[name]
        if name in GREEK:
            return self.subscripted(name)
        if name in _FRAC:
            num = self.argument()
            return _div(num, self.argument())
        if name == "sqrt":
            index: sympy.Basic = sympy.Integer(2)
            if self.at_op("["):
                self.take()
                index = self.expr()
                self.expect("]")
            return _pow(self.argument(), _div(sympy.Integer(1), index))
        if name in _BINOM:
            n = self.argument()
            return _binomial(n, self.argument())
        if name in _FUNCTIONS:
            return self.function(name)
        raise ParseError(f"unexpected \\{name}")

    def variable(self, letter: str) -> sympy.Basic:
        if not self.at_op("_"):
            if letter == "i":
                return sympy.I
            if letter == "e":
                return sympy.E
        return self.subscripted(letter)

    def subscripted(self, name: str) -> sympy.Symbol:
        if not self.at_op("_"):
            return sympy.Symbol(name)
        self.take()
        t = self.take()
        if t.kind in ("num", "var"):
            sub = t.text
        elif t.kind == "op" and t.text == "{":
            parts = []
            while not self.at_op("}"):
                part = self.take()
                if part.kind not in ("num", "var") or len(parts) >= 8:
                    raise ParseError("unsupported subscript")
                parts.append(part.text)
            self.take()
            sub = "".join(parts)
        else:
            raise ParseError("unsupported subscript")
        return sympy.Symbol(f"{name}_{sub}")

    def argument(self) -> sympy.Basic:
        """One argument of \\frac, \\sqrt or \\binom: a group or a single character (\\frac12)."""
        t = self.peek()
        if t is None:
            raise ParseError("missing argument")
        if t.kind == "op" and t.text in "({":  # sqrt(2) in plain text
            return self.primary()
        if t.kind == "num":
            self.take()
            if len(t.text) > 1:
                self.toks.insert(self.pos, Token("num", t.text[1:]))
            return _number(t.text[0])
        if t.kind == "var" or (t.kind == "name" and (t.text in _CONSTANTS or t.text in GREEK)):
            return self.primary()
        raise ParseError("unsupported argument")

    def function(self, name: str) -> sympy.Basic:
        base = None
        if name == "log" and self.at_op("_"):
            self.take()
            base = self.argument()
        power = None
        if self.at_op("^"):
            self.take()
            power = self.exponent()
        fn = _FUNCTIONS[name]
        if power == -1 and name in _INVERSE:
            fn, power = _INVERSE[name], None
        if self.at_op("(") or self.at_op("{"):
            arg = self.primary()
        else:  # \sin 2x is sin(2x); \sin x \cos x is sin(x)cos(x)
            self.enter()
            arg = self.power()
            while ((t := self.peek()) is not None and self.starts_operand(t) and t.kind != "num"
                   and not (t.kind == "name" and t.text in _FUNCTIONS)):
                arg = _mul(arg, self.power())
            self.depth -= 1
        value = _checked(sympy.log(arg, base) if base is not None else fn(arg))
        return value if power is None else _pow(value, power)


def parse_math(text: str) -> sympy.Basic:
    """The sympy expression for one scalar answer, or ParseError.

    Undefined values (division by zero) are refused too, so '1/0' never equals '2/0'.
    """
    toks = tokenize(text)
    if not toks:
        raise ParseError("empty")
    expr = _Parser(toks).parse()
    if expr.has(sympy.zoo, sympy.nan):
        raise ParseError("undefined value")
    return expr
