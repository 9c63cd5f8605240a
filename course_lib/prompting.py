"""What a prompt does to a base model: it is the context the next-token distribution is conditioned on.

Three measurements make that visible::

    next_token_distribution(model, tokenizer, ["Once upon a time", "The dragon"])    # (2, vocab)
    continuation_logprob(model, tokenizer, "Once upon a time", " there was")        # log p(continuation | prompt)
    complete(model, tokenizer, "Once upon a time", max_new_tokens=30)               # greedy text

Every text starts after ``<|endoftext|>`` (the tokenizer's BOS): the bundled models saw each training story
right after that token, so it is the honest "start of a story" context, and it lets the prompt be empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from course_lib.data import encode_prompt, encode_prompts, text_list
from course_lib.decoding import greedy_search, next_token_probs
from course_lib.metrics import next_token_logprobs
from course_lib.models import check_fits


def next_token_distribution(model, tokenizer, prompts: str | Sequence[str]) -> torch.Tensor:
    """The distribution over the next token after each prompt: (vocab,) for one prompt, (B, vocab) for a list."""
    ids, mask = encode_prompts(tokenizer, prompts)  # (B, T) each
    check_fits(model, ids.shape[1])
    probs = next_token_probs(model, ids, attention_mask=mask)  # (B, vocab); it moves ids and mask
    return probs[0] if isinstance(prompts, str) else probs


@dataclass
class ContinuationScore:
    """log p(continuation | prompt) and its per-token breakdown (natural log, nats)."""

    prompt: str
    continuation: str
    tokens: list[str]  # the continuation's tokens as text
    token_ids: list[int]
    logprobs: list[float]  # log p(token_i | prompt, tokens before i)

    @property
    def total(self) -> float:
        """Sum of the per-token log-probabilities: the log-probability of the whole continuation."""
        return sum(self.logprobs)

    @property
    def mean(self) -> float:
        """Average per token: compares continuations of different lengths more fairly than ``total``."""
        return self.total / len(self.logprobs)

    def table(self) -> str:
        """A markdown table of the per-token breakdown."""
        lines = ["| token | id | log p | p |", "|---|---|---|---|"]
        for tok, tid, lp in zip(self.tokens, self.token_ids, self.logprobs):
            lines.append(f"| {tok!r} | {tid} | {lp:.4f} | {math.exp(lp):.4f} |")
        lines.append(f"| **total** | | **{self.total:.4f}** | {math.exp(self.total):.2e} |")
        return "\n".join(lines)


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: str | Sequence[str],
                          continuations: Sequence[str]) -> list[ContinuationScore]:
    """Score many continuations in one batched forward pass.

    ``prompts`` is one prompt shared by all continuations, or one prompt per continuation. Prompt and
    continuation are tokenized separately and joined, so a continuation that follows a word should start
    with a space (``" there was"``), exactly as the tokenizer would split the joined text.
    """
    conts = text_list(continuations, "continuations")
    texts = [prompts] * len(conts) if isinstance(prompts, str) else list(prompts)
    if len(texts) != len(conts):
        raise ValueError(f"got {len(texts)} prompts for {len(conts)} continuations; give one prompt or one per continuation")
    prompt_rows = [encode_prompt(tokenizer, p) for p in texts]
    cont_rows = [tokenizer(c)["input_ids"] for c in conts]
    for c, row in zip(conts, cont_rows):
        if not row:
            raise ValueError(f"continuation {c!r} has no tokens: nothing to score")
    rows = [p + c for p, c in zip(prompt_rows, cont_rows)]
    check_fits(model, max(len(r) for r in rows), what="prompt + continuation")
    # Pad on the RIGHT here: under a causal mask, padding AFTER the text cannot change the text's positions or
    # logits, so a plain forward pass scores every row exactly as it would alone.
    batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt", padding_side="right")
    logp = next_token_logprobs(model, batch["input_ids"], batch["attention_mask"]).cpu()  # (B, T-1)
    scores = []
    for b, (p_row, c_row) in enumerate(zip(prompt_rows, cont_rows)):
        start = len(p_row) - 1  # the prediction of the continuation's first token sits at the prompt's last position
        scores.append(ContinuationScore(
            prompt=texts[b], continuation=conts[b], token_ids=list(c_row),
            tokens=[tokenizer.decode([t]) for t in c_row],
            logprobs=logp[b, start : start + len(c_row)].tolist(),
        ))
    return scores


def continuation_logprob(model, tokenizer, prompt: str, continuation: str) -> ContinuationScore:
    """log p(continuation | prompt) under ``model``, with the per-token breakdown."""
    return continuation_logprobs(model, tokenizer, prompt, [continuation])[0]


def complete(model, tokenizer, prompts: str | Sequence[str], max_new_tokens: int = 40) -> str | list[str]:
    """The greedy continuation of each prompt (only the new text), from ``course_lib.decoding.greedy_search``."""
    ids, mask = encode_prompts(tokenizer, prompts)  # (B, T) each
    # past the window GPT-2's position embedding fails with a bare IndexError; say what happened instead
    check_fits(model, ids.shape[1] + max_new_tokens, what=f"prompt ({ids.shape[1]} tokens) + max_new_tokens")
    # greedy_search checks the host tensors (no device sync), then moves them to the model's device
    out = greedy_search(model, ids, mask, max_new_tokens=max_new_tokens).sequences  # (B, T + new)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts[0] if isinstance(prompts, str) else texts


def few_shot_prompt(examples: Sequence[str], prompt: str = "", separator: str = "<|endoftext|>") -> str:
    """Examples joined by ``separator``, then ``prompt``: in-context examples of the pattern to continue.

    For our base models the natural separator is ``<|endoftext|>``: it is how stories were separated in training.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("few_shot_prompt needs at least one example")
    return separator.join([*examples, prompt])
