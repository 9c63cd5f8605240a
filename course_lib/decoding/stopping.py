"""What ends generation: each criterion looks at the ids so far and says, per row, "this row is done".

A criterion is any callable ``(input_ids (B, T), scores (B, vocab)) -> BoolTensor (B,)``, the same shape as
``transformers.StoppingCriteria``: ``scores`` are the processed scores of the step that just picked the last
token (every course decoder passes them). A row finishes when ANY criterion says so; generation ends when every
row has finished. The criteria below look at the ids only, so they can also be called on ids alone.

    stopping = [StopStrings(tokenizer, ["The end."]), TimeLimit(2.0), lambda ids, s: ids[:, -1] == period_id]
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from course_lib.checks import check_arg, is_integer, is_number

Criterion = Callable[[torch.LongTensor, torch.Tensor], torch.BoolTensor]  # (ids (B, T), scores (B, vocab)) -> (B,)


class EosStop:
    """Done once the newest token is an end-of-sequence id (rows may finish at different steps)."""

    def __init__(self, eos_token_id: int | Sequence[int]):
        ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if not ids:
            raise ValueError("EosStop needs at least one end-of-sequence token id")
        self.eos_ids = torch.tensor(ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None = None) -> torch.BoolTensor:
        return torch.isin(input_ids[:, -1], self.eos_ids.to(input_ids.device))  # (B,)


class MaxNewTokens:
    """Done once ``max_new_tokens`` tokens follow the prompt of length ``prompt_len`` (all rows at once)."""

    def __init__(self, prompt_len: int, max_new_tokens: int):
        check_arg("max_new_tokens", max_new_tokens, is_integer(max_new_tokens) and max_new_tokens >= 0, "an integer >= 0")
        self.max_length = prompt_len + max_new_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None = None) -> torch.BoolTensor:
        done = input_ids.shape[1] >= self.max_length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class TimeLimit:
    """Done for every row once ``seconds`` of wall-clock time have passed since this object was made
    (make it right before generating). Useful to bound latency; the output length then depends on speed."""

    def __init__(self, seconds: float):
        check_arg("seconds", seconds, is_number(seconds) and seconds > 0, "a number > 0 (the wall-clock budget)")
        self.seconds = seconds
        self.start = time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None = None) -> torch.BoolTensor:
        done = time.perf_counter() - self.start > self.seconds
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class StopStrings:
    """Done once the decoded text gains one of ``stop_strings`` with the newest token.

    Stop strings live in text, not in token ids: "The end." may arrive as one token or as four, so each row's
    recent tokens are decoded and searched. Only a match that ends inside the newest token counts, so a stop
    string already in the prompt does not stop anything. Decoding needs the ids on the host: one sync per step.
    """

    def __init__(self, tokenizer, stop_strings: str | Sequence[str]):
        check_arg("stop_strings", stop_strings, isinstance(stop_strings, (str, list, tuple)),
              "a string or a list of strings")
        strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not strings:
            raise ValueError("StopStrings needs at least one stop string")
        if any(not isinstance(s, str) or s == "" for s in strings):
            raise ValueError(f"stop strings must be non-empty strings, got {strings!r}")
        self.tokenizer = tokenizer
        self.stop_strings = strings
        # Every token decodes to at least one character, so this many tokens always cover the longest string.
        self.window = max(len(s) for s in strings) + 1

    def _row_done(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        before = len(self.tokenizer.decode(ids[:-1]))  # where the newest token's text starts
        return any(text.find(s, max(0, before - len(s) + 1)) != -1 for s in self.stop_strings)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor | None = None) -> torch.BoolTensor:
        rows = input_ids[:, -self.window:].tolist()
        return torch.tensor([self._row_done(r) for r in rows], dtype=torch.bool, device=input_ids.device)


def any_stop(criteria: Sequence[Criterion], input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.BoolTensor:
    """OR of all criteria: (B,) True where some criterion says the row is done."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for criterion in criteria:
        verdict = torch.as_tensor(criterion(input_ids, scores), device=input_ids.device)
        if verdict.shape != done.shape:
            raise ValueError(f"a stopping criterion must return one bool per sequence, shape {tuple(done.shape)}; "
                             f"{criterion!r} returned shape {tuple(verdict.shape)}")
        done = done | verdict.bool()
    return done
