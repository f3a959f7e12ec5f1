"""GSM8K: grade-school word problems with line-per-step rationales ending '#### N'.

Records are JSONL with `question`/`answer` (the original release) or `query`/`response` (the
Self-Explore release). The rationale is turned into the form the model is trained on: blank
lines dropped, calculator notes like `<<48/2=24>>` removed (unless
`keep_calculator_notes=True`: they are annotation, not reasoning a model should imitate, and
the paper's answer format has none), and the final `#### N` replaced by `The answer is N`.
The gold answer is N without thousands separators ('1,450,000' -> '1450000').
"""

from __future__ import annotations

import re

from selfexplore.tasks.base import ANSWER_LINE, ANSWER_PREFIX, JsonlTask, split_lines

CALCULATOR_NOTE = re.compile(r"<<[^<>\n]*>>")
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def to_trained_form(text: str, keep_calculator_notes: bool = False) -> tuple[str, str]:
    """(rationale ending 'The answer is N', gold N) from a GSM8K rationale ending '#### N'.

    A rationale already ending with a line 'The answer is N' is accepted too. Raises
    ValueError rather than guess a gold answer: empty text, more than one '####', a '####'
    not on the last line, or a final answer that is not a plain number.
    """
    lines = [line.rstrip() for line in text.strip().split("\n") if line.strip()]
    if not lines:
        raise ValueError("empty solution")
    last = lines[-1].strip()
    if "####" in text:
        if text.count("####") != 1 or not last.startswith("####"):
            raise ValueError("expected exactly one '#### N' answer, on the last line")
        raw_answer = last[len("####"):].strip()
    elif (match := ANSWER_LINE.fullmatch(last)) is not None:
        raw_answer = match.group(1)
    else:
        raise ValueError("no gold answer: the solution must end with a '#### N' line "
                         "(or a 'The answer is N' line)")
    answer = raw_answer.replace(",", "").lstrip("+")
    if not _NUMBER.fullmatch(answer):
        raise ValueError(f"gold answer {raw_answer!r} is not a number")
    body = lines[:-1]
    if not keep_calculator_notes:
        body = [CALCULATOR_NOTE.sub("", line) for line in body]
        body = [line for line in body if line.strip()]
    return "\n".join([*body, f"{ANSWER_PREFIX} {answer}"]), answer


class GSM8KTask(JsonlTask):
    """GSM8K from JSONL files; steps are non-empty lines, graded numerically.

    Options: `keep_calculator_notes` (default False: `<<a*b=c>>` notes are stripped from the
    gold rationales), `lenient` (default False: a bad record raises DataError; True skips it
    and lists it in `last_load_stats`).
    """

    name = "gsm8k"
    grading_task = "gsm8k"
    layouts = (("question", "answer"), ("query", "response"))

    def __init__(self, keep_calculator_notes: bool = False, lenient: bool = False) -> None:
        super().__init__(lenient=lenient)
        self.keep_calculator_notes = keep_calculator_notes

    def parse_solution(self, text: str) -> tuple[str, str]:
        return to_trained_form(text, self.keep_calculator_notes)

    def split_steps(self, text: str) -> list[str]:
        return split_lines(text)
