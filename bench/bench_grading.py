"""Bench: how often does the MATH grader agree with public regression cases of other graders?

Question: on (gold, prediction, expected) cases copied from the tests of open-source math
verifiers (bench/data/grading_regression.jsonl, each case citing its repository, file and
licence), how often does `is_equiv(pred, gold, "math")` give the expected verdict, how many of
its disagreements are false accepts and false rejects, how long does the slowest call take,
and does grading ever execute code? A case with "decimals" states a rounding (the source
test's float precision) and is graded with `decimals=` that many places.

Second check: every MATH-style gold answer must equal itself and its own \\boxed{}
re-extraction. There is no MATH dataset on this machine, so the answers are the gold answers
of the regression corpus plus those of the MATH cases in tests/test_grading*.py.

Code executions are counted, not assumed: an audit hook counts every `exec`/`compile` of code
and every process started while grading runs. Grading runs on the main thread (in-process time
limit), after one warm-up call. Prints one JSON line per result; about 10 s on 2 cores.

`--parser lark` grades with sympy's Lark LaTeX grammar (`pip install lark`) instead of our
parser, through a transformer with our parser's guards (bounded powers, factorials and
binomials; decimals as exact rationals). `--expected math-verify` takes every case's verdict
from Math-Verify itself (`pip install math-verify`; its `parse` + `verify`, float rounding =
the case's `decimals` or its default 6) instead of the source test's: docs/grading.md reports both.

    python bench/bench_grading.py [--parser lark] [--expected math-verify]
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from _harness import bench_parser, emit, parse_args

from selfexplore.grading import GRADER_VERSION, extract_answer, is_equiv

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "bench" / "data" / "grading_regression.jsonl"
_CODE_EVENTS = frozenset({"exec", "compile", "subprocess.Popen", "os.system", "os.exec",
                          "os.posix_spawn"})


class CodeCounter:
    """Counts audit events that run code or start processes while `active` is set."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[object, ...]) -> None:
        if self.active and event in _CODE_EVENTS:
            self.count += 1


def load_corpus(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def timed(counter: CodeCounter, fn: Callable[[], bool]) -> tuple[bool, float]:
    counter.active = True
    start = time.perf_counter()
    try:
        return fn(), time.perf_counter() - start
    finally:
        counter.active = False


def pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def regression(cases: list[dict[str, object]], counter: CodeCounter) -> None:
    """One line for the whole corpus, one per source file, one per disagreement."""
    worst = 0.0
    by_source: Counter[tuple[str, str]] = Counter()
    totals: Counter[str] = Counter()
    for case in cases:
        gold, pred, expected = str(case["gold"]), str(case["pred"]), bool(case["expected"])
        decimals = case.get("decimals")
        got, seconds = timed(counter, lambda: is_equiv(pred, gold, "math", decimals=decimals))
        worst = max(worst, seconds)
        outcome = ("agree" if got == expected else
                   "false_accept" if got else "false_reject")
        source_file = str(case["source"]).split("::")[0].split(" (")[0]
        by_source[(source_file, outcome)] += 1
        totals[outcome] += 1
        if outcome != "agree":
            emit(result="disagreement", outcome=outcome, gold=gold, pred=pred,
                 decimals=decimals, source=case["source"])
    for source_file in sorted({s for s, _ in by_source}):
        n = sum(v for (s, _), v in by_source.items() if s == source_file)
        emit(result="source_agreement", source=source_file, cases=n,
             agreement_pct=pct(by_source[(source_file, "agree")], n),
             false_accepts=by_source[(source_file, "false_accept")],
             false_rejects=by_source[(source_file, "false_reject")])
    n = len(cases)
    emit(result="regression_agreement", grader=GRADER_VERSION, corpus=str(CORPUS.relative_to(ROOT)),
         cases=n, agreement_pct=pct(totals["agree"], n),
         false_accepts=totals["false_accept"], false_accepts_pct=pct(totals["false_accept"], n),
         false_rejects=totals["false_reject"], false_rejects_pct=pct(totals["false_reject"], n),
         worst_call_s=round(worst, 4), code_executions=counter.count)


def _test_golds(path: Path) -> Iterator[str]:
    """The `gold` arguments of the parametrized MATH tests (test_math_*) in one test file."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.FunctionDef) and node.name.startswith("test_math")):
            continue
        for deco in node.decorator_list:
            if (isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize"
                    and isinstance(deco.args[0], ast.Constant)):
                names = [n.strip() for n in str(deco.args[0].value).split(",")]
                if "gold" in names:
                    for row in ast.literal_eval(deco.args[1]):
                        yield row[names.index("gold")]


def _unwrapped(answer: str) -> str:
    """The answer without one enclosing $...$ or $$...$$ (what would sit inside \\boxed{})."""
    s = answer.strip()
    for fence in ("$$", "$"):
        if len(s) > 2 * len(fence) and s.startswith(fence) and s.endswith(fence):
            return s[len(fence):-len(fence)].strip()
    return s


def self_consistency(cases: list[dict[str, object]], counter: CodeCounter) -> None:
    """Each gold against itself and against its \\boxed{} re-extraction from a rationale."""
    golds = {str(c["gold"]) for c in cases}
    tests = sorted((ROOT / "tests").glob("test_grading*.py"))
    golds |= {g for path in tests for g in _test_golds(path)}
    golds = {g for g in golds if g.strip()}
    same = boxed = 0
    failures = []
    for gold in sorted(golds):
        ok_self, _ = timed(counter, lambda: is_equiv(gold, gold, "math"))
        rationale = f"So we get this.\nThe final answer is $\\boxed{{{_unwrapped(gold)}}}$."
        extracted = extract_answer(rationale, "math")
        ok_boxed, _ = timed(counter, lambda: is_equiv(extracted, gold, "math"))
        same += ok_self
        boxed += ok_boxed
        if not (ok_self and ok_boxed):
            failures.append({"gold": gold, "extracted": extracted})
    emit(result="self_consistency", grader=GRADER_VERSION, answers=len(golds),
         answers_from="gold answers of the regression corpus and of the test_math_* cases in "
                      "tests/test_grading*.py (no MATH dataset on this machine)",
         self_pct=pct(same, len(golds)), boxed_reextraction_pct=pct(boxed, len(golds)),
         failures=failures, code_executions=counter.count)


def math_verify_verdicts(cases: list[dict[str, object]]) -> list[dict[str, object]]:
    """`cases` with Math-Verify's own verdict as `expected` (its test suite's extraction settings)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    targets = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    out = []
    for case in cases:
        gold, pred = parse(str(case["gold"]), targets), parse(str(case["pred"]), targets)
        out.append({**case, "expected": verify(gold, pred, float_rounding=case.get("decimals") or 6)})
    return out


def lark_parser() -> Callable[[str], object]:
    """sympy's Lark LaTeX parser with our parser's guards, as a drop-in for `parse_math`."""
    import sympy
    from sympy.parsing.latex.lark import LarkLaTeXParser, TransformToSymPyExpr

    from selfexplore.grading import latex_parser as ours

    class Guarded(TransformToSymPyExpr):
        def number(self, tokens):  # exact decimals, bounded literals
            return sympy.I if tokens[0].type == "CMD_IMAGINARY_UNIT" else ours._number(str(tokens[0]))

        def superscript(self, tokens):
            if len(tokens) == 3 and isinstance(tokens[2], sympy.Expr) and isinstance(tokens[0], sympy.Expr):
                return ours._pow(tokens[0], tokens[2])
            return super().superscript(tokens)

        def factorial(self, tokens):
            return ours._factorial(tokens[0])

        def binomial(self, tokens):
            return ours._binomial(tokens[1], tokens[2])

        def _ambig(self, options):  # Earley keeps every reading: take one only when all agree
            if all(o == options[0] for o in options):
                return options[0]
            raise ours.ParseError("ambiguous")

    lark = LarkLaTeXParser(transformer=Guarded)

    def parse(text: str) -> object:
        try:
            expr = lark.doparse(text)
        except ours.ParseError:
            raise
        except Exception as err:  # noqa: BLE001 - any grammar or transform failure is "not parsed"
            raise ours.ParseError(str(err)) from err
        if not isinstance(expr, sympy.Basic) or expr.has(sympy.zoo, sympy.nan):
            raise ours.ParseError("not an expression")
        return expr

    return parse


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__.splitlines()[0], repeats=None)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--limit", type=int, help="grade only the first N cases")
    parser.add_argument("--parser", choices=("ours", "lark"), default="ours", help="the scalar LaTeX parser")
    parser.add_argument("--expected", choices=("source", "math-verify"), default="source",
                        help="whose verdicts count as expected")
    args = parse_args(parser, argv, smoke={"limit": 20})
    if args.parser == "lark":
        if importlib.util.find_spec("lark") is None:
            parser.error("--parser lark needs the lark package (pip install lark)")
        from selfexplore.grading import symbolic

        symbolic.parse_math = lark_parser()
    cases = load_corpus(args.corpus)[:args.limit]
    if args.expected == "math-verify":
        cases = math_verify_verdicts(cases)
    is_equiv("2x+2", "2(x+1)", "math")  # warm-up: sympy's one-off import cost, outside timing
    counter = CodeCounter()
    regression(cases, counter)
    self_consistency(cases, counter)


if __name__ == "__main__":
    main()
