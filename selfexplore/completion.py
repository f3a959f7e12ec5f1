"""A sampled text that says whether the model ended it (torch-free, so pure code can read it)."""

from __future__ import annotations


class Completion(str):
    """A sampled text that also says whether the model ended it.

    `finished` is False when `max_new_tokens` cut the text before an end token or stop string.
    A cut text is not a whole response: it must not be trained on as one (RFT, a chosen side),
    and as a rejected side it gets no end token (the policy never stopped there). It is a `str`,
    so code that only needs the text is unaffected; a plain `str` from another sampler counts
    as finished. `tokens` is how many tokens the model generated for it (end or stop token
    included), so a caller can charge each completion its own cost; None when unknown.
    """

    finished: bool
    tokens: int | None

    def __new__(cls, text: str, finished: bool = True, tokens: int | None = None) -> Completion:
        obj = super().__new__(cls, text)
        obj.finished = finished
        obj.tokens = tokens
        return obj


def is_finished(text: str) -> bool:
    """Whether a sampler's completion was ended by the model (True for plain strings)."""
    return getattr(text, "finished", True)
