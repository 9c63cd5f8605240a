"""Logits processors: small rules that reshape the next-token scores before a token is chosen.

Each processor is an object called as ``processor(input_ids, scores) -> new_scores`` with ``input_ids`` of shape
(B, T) (everything so far, prompt included) and ``scores`` of shape (B, vocab). None of them modifies its input.
They compose in a plain list, applied left to right by ``apply_processors``, the way
``transformers.LogitsProcessorList`` does; each one gives the same result as its ``transformers`` counterpart
(named in its docstring, checked in tests/test_processors.py).

Two kinds, as in ``transformers``: penalties change scores of tokens already seen; warpers (temperature, top-k,
top-p, min-p, typical-p) reshape the distribution and set the tokens they cut to ``filter_value`` (-inf), so the
softmax gives them probability 0.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from course_lib.checks import check_arg, is_integer, is_number

Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NEG_INF = -float("inf")


def apply_processors(processors: Sequence[Processor], input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run ``scores`` through each processor in order (an empty list returns ``scores`` unchanged)."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def check_scores(scores: torch.Tensor) -> None:
    """Clear errors for scores no processor can take: not (batch, vocab), or holding NaN (one host sync)."""
    if getattr(scores, "ndim", None) != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a (batch, vocab) tensor, got {shape}; for a single row pass scores[None]")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores hold NaN, so no token can be ranked or sampled; check the model's logits and "
                         "the processors before this one (inf - inf and 0 * inf give NaN)")


def token_counts(input_ids: torch.Tensor, vocab_size: int, ignore_first: int | torch.Tensor = 0) -> torch.Tensor:
    """How often each vocabulary id occurs in each row of ``input_ids``: (B, vocab) int64.

    ``ignore_first`` (an int, or one int per row) leading positions are not counted: left padding, or the prompt.
    """
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
    ignore = torch.as_tensor(ignore_first, device=input_ids.device).reshape(-1, 1)  # (B or 1, 1)
    # Ignored positions (and ids the lm head cannot produce) land in a spare column that is cut off at the end.
    ids = input_ids.clamp(max=vocab_size).masked_fill(positions < ignore, vocab_size)  # (B, T)
    counts = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.long, device=input_ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    return counts[:, :vocab_size]  # (B, vocab)


class _Truncation:
    """What the warpers that cut tokens share: the score a cut token gets, and how many tokens always survive."""

    def __init__(self, filter_value: float, min_tokens_to_keep: int):
        ok = is_integer(min_tokens_to_keep) and min_tokens_to_keep >= 1
        check_arg("min_tokens_to_keep", min_tokens_to_keep, ok, "an integer >= 1")
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep


class Temperature:
    """Divide the logits by ``temperature``: < 1 sharpens, > 1 flattens. Matches ``TemperatureLogitsWarper``."""

    def __init__(self, temperature: float):
        check_arg("temperature", temperature, is_number(temperature) and temperature > 0,
               "a number > 0 (for T -> 0 use greedy decoding instead)")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        return scores / self.temperature


class TopK(_Truncation):
    """Keep the ``top_k`` highest scores (ties with the k-th are kept too); ``top_k=0`` keeps everything.

    Fan et al. 2018, arXiv:1805.04833. Matches ``TopKLogitsWarper`` (which ``generate`` leaves out when top_k=0).
    """

    def __init__(self, top_k: int, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        check_arg("top_k", top_k, is_integer(top_k) and top_k >= 0, "an integer >= 0 (0 disables top-k)")
        super().__init__(filter_value, min_tokens_to_keep)
        self.top_k = top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        if self.top_k == 0:
            return scores
        k = min(max(self.top_k, self.min_tokens_to_keep), scores.shape[-1])
        kth_best = torch.topk(scores, k, dim=-1).values[:, -1:]  # (B, 1)
        return scores.masked_fill(scores < kth_best, self.filter_value)


class TopP(_Truncation):
    """Nucleus sampling: keep the smallest set of most likely tokens whose probabilities add up to >= ``top_p``.

    Holtzman et al. 2019, arXiv:1904.09751. The token whose probability crosses ``top_p`` is kept.
    Matches ``TopPLogitsWarper``.
    """

    def __init__(self, top_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        check_arg("top_p", top_p, is_number(top_p) and 0 < top_p <= 1, "a number in (0, 1] (1 keeps everything)")
        super().__init__(filter_value, min_tokens_to_keep)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        if self.top_p == 1.0:  # keeps everything (summing the probabilities could round past 1 and cut the tail)
            return scores
        # Most likely first: a token is kept while the tokens ranked above it hold less than top_p of the mass,
        # so the most likely token always stays, and so does the one that crosses top_p.
        sorted_scores, order = torch.sort(scores, descending=True)  # (B, vocab) each
        probs = sorted_scores.softmax(dim=-1)  # (B, vocab)
        mass_before = probs.cumsum(dim=-1) - probs  # (B, vocab): the mass ranked above each token
        drop_sorted = mass_before >= self.top_p
        drop_sorted[:, : self.min_tokens_to_keep] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
        return scores.masked_fill(drop, self.filter_value)


class MinP(_Truncation):
    """Keep tokens whose probability is at least ``min_p`` times the top token's probability.

    Nguyen et al. 2024, arXiv:2407.01082. Matches ``MinPLogitsWarper``.
    """

    def __init__(self, min_p: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        check_arg("min_p", min_p, is_number(min_p) and 0 <= min_p <= 1, "a number in [0, 1] (0 keeps everything)")
        super().__init__(filter_value, min_tokens_to_keep)
        self.min_p = float(min_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        probs = scores.softmax(dim=-1)  # (B, vocab)
        threshold = self.min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1): confident steps cut harder
        drop = probs < threshold
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        drop = drop.scatter(1, torch.topk(probs, k, dim=-1).indices, False)
        return scores.masked_fill(drop, self.filter_value)


class TypicalP(_Truncation):
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to ``mass``.

    Meister et al. 2022, arXiv:2202.00666. May drop the single most likely token. Matches ``TypicalLogitsWarper``.
    """

    def __init__(self, mass: float, filter_value: float = NEG_INF, min_tokens_to_keep: int = 1):
        check_arg("typical_p", mass, is_number(mass) and 0 < mass < 1, "a number in (0, 1) (generate skips 1.0)")
        super().__init__(filter_value, min_tokens_to_keep)
        self.mass = float(mass)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        logprobs = scores.log_softmax(dim=-1)  # (B, vocab)
        entropy = -(logprobs * logprobs.exp()).nansum(dim=-1, keepdim=True)  # (B, 1); nansum: 0 * -inf terms
        distance = (-logprobs - entropy).abs()  # (B, vocab): how far each surprisal is from the typical one
        sorted_distance, order = torch.sort(distance, descending=False)
        mass_up_to = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)  # (B, vocab)
        # Keep tokens up to and including the first one whose cumulative mass reaches `mass`.
        last_kept = (mass_up_to < self.mass).sum(dim=1, keepdim=True).clamp(max=scores.shape[-1] - 1)  # (B, 1)
        drop_sorted = sorted_distance > sorted_distance.gather(1, last_kept)
        drop_sorted[:, : self.min_tokens_to_keep] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        return scores.masked_fill(drop, self.filter_value)


class RepetitionPenalty:
    """CTRL's penalty (Keskar et al. 2019, arXiv:1909.05858) on every token already in the sequence.

    A seen token's logit is divided by ``penalty`` when positive and multiplied by it when negative, so
    ``penalty > 1`` always lowers it. Applied once per token, however often it occurred. ``ignore_first`` leading
    positions per row (left padding) are not looked at. Matches ``RepetitionPenaltyLogitsProcessor``.
    """

    def __init__(self, penalty: float, ignore_first: int | torch.Tensor = 0):
        check_arg("penalty", penalty, is_number(penalty) and penalty > 0,
               "a number > 0 (1 = no penalty, > 1 discourages repeats, < 1 encourages them)")
        self.penalty = float(penalty)
        self.ignore_first = ignore_first

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        seen = token_counts(input_ids, scores.shape[-1], self.ignore_first) > 0  # (B, vocab)
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalized, scores)


class FrequencyPresencePenalty:
    """Subtract ``frequency * count + presence * (count > 0)`` from each token's logit.

    The additive penalties of the OpenAI API (both in [-2, 2] there). Unlike ``RepetitionPenalty`` the frequency
    term grows with every repeat. Counts start after ``ignore_first`` positions per row; ``sample`` passes the
    prompt length so that only generated tokens count, as OpenAI and vLLM do. No ``transformers`` counterpart.
    """

    def __init__(self, frequency: float = 0.0, presence: float = 0.0, ignore_first: int | torch.Tensor = 0):
        for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
            check_arg(name, value, is_number(value) and -2 <= value <= 2, "a number in [-2, 2]")
        self.frequency = float(frequency)
        self.presence = float(presence)
        self.ignore_first = ignore_first

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        counts = token_counts(input_ids, scores.shape[-1], self.ignore_first).to(scores.dtype)  # (B, vocab)
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class NoRepeatNGram:
    """Ban any token that would complete an n-gram already present in the row (prompt included).

    Matches ``NoRepeatNGramLogitsProcessor``; ``ngram_size=1`` bans every token seen so far.
    """

    def __init__(self, ngram_size: int):
        check_arg("ngram_size", ngram_size, is_integer(ngram_size) and ngram_size >= 1, "an integer >= 1")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_scores(scores)
        n, length, vocab = self.ngram_size, input_ids.shape[1], scores.shape[-1]
        if length < n:
            return scores
        # The next token completes the n-gram (last n-1 tokens, next). Every earlier window whose first n-1 tokens
        # equal that suffix bans its own last token.
        suffix = input_ids[:, length - n + 1:]  # (B, n-1)
        windows = input_ids.unfold(1, n, 1)  # (B, length-n+1, n)
        matches = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # (B, length-n+1)
        # Non-matching windows point at a spare column past the vocabulary, which is cut off.
        target = torch.where(matches, windows[..., -1].clamp(max=vocab), vocab)  # (B, length-n+1)
        banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, target, True)
        return scores.masked_fill(banned[:, :vocab], NEG_INF)
