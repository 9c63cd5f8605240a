"""Speculative decoding from scratch: a cheap draft guesses k tokens, the target checks them in ONE forward.

Leviathan et al. 2023 (arXiv:2211.17192) and Chen et al. 2023 (arXiv:2302.01318). At batch 1 a decode step
costs about the same for 1 or k+1 tokens (the weights are read once either way), so every draft token the
target agrees with is a token for free. Each verification step emits between 1 and k+1 tokens:

    out = speculative_generate(target, input_ids, draft=draft, k=4, max_new_tokens=64)
    out.sequences, out.acceptance_rate

Both models see the same ``processors`` (temperature, top-k, top-p, ...), as gpt-fast passes its sampling
settings to both. Greedy (``do_sample=False``) gives exactly the target's own greedy text. Sampling keeps exactly
the target's distribution: draft token x is accepted with probability min(1, p(x)/q(x)); at the first rejection
the replacement is drawn from max(0, p - q) renormalised; after k acceptances a bonus token comes from p.
One sequence at a time: rows of a batch would accept different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from course_lib.checks import check_arg, is_integer, is_number
from course_lib.decoding.prepare import GenerateOutput, append_and_stop, prepare
from course_lib.decoding.processors import Processor, apply_processors
from course_lib.decoding.sampling import seed_rng
from course_lib.decoding.steps import forward, new_cache
from course_lib.decoding.stopping import Criterion
from course_lib.models import check_fits


@dataclass
class SpeculativeOutput(GenerateOutput):
    """The generated ids (1, prompt + new) plus the bookkeeping that explains the speed-up."""

    prompt_length: int
    proposed: int  # draft tokens offered to the target
    accepted: int  # of those, how many it kept
    rejected: int  # verification steps that ended in a rejection (at most one per step)
    target_calls: int  # target forwards (each checks up to k draft tokens)

    @property
    def new_tokens(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def acceptance_rate(self) -> float:
        """Leviathan et al.'s alpha, estimated: the fraction of the draft tokens the target judged that it accepted.

        Guesses after a step's first rejection are thrown away unjudged, so they do not count (0 if none judged).
        """
        judged = self.accepted + self.rejected
        return self.accepted / judged if judged else 0.0

    @property
    def kept_fraction(self) -> float:
        """Fraction of all proposed draft tokens that ended up in the output (<= ``acceptance_rate``)."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else 0.0


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens per verification step, (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al., eq. 1)."""
    _check_alpha_k(alpha, k)
    if alpha == 1.0:
        return float(k + 1)
    return (1 - alpha ** (k + 1)) / (1 - alpha)


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Expected wall-time speed-up over the target alone (Leviathan et al., Theorem 3.8).

    ``alpha``: acceptance rate, ``k``: draft tokens per step, ``c``: cost of one draft forward relative to
    one target forward. One step costs k*c + 1 target-forward units and yields ``expected_tokens_per_step``.
    """
    _check_alpha_k(alpha, k)
    check_arg("c", c, is_number(c) and c >= 0, "a number >= 0 (one draft forward's cost, in target forwards)")
    return expected_tokens_per_step(alpha, k) / (k * c + 1)


def _check_k(k: int) -> None:
    check_arg("k", k, is_integer(k) and k >= 1, "an integer >= 1 (draft tokens per step)")


def _check_alpha_k(alpha: float, k: int) -> None:
    check_arg("alpha", alpha, is_number(alpha) and 0.0 <= alpha <= 1.0, "an acceptance rate in [0, 1]")
    _check_k(k)


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep draft tokens while they equal the target's argmax; then take the target's own choice.

    ``draft_tokens`` (B, k), ``target_logits`` (B, k+1, vocab). Returns (accepted count (B,), next token (B,)).
    """
    k = draft_tokens.shape[1]
    choice = target_logits.argmax(-1)  # (B, k+1)
    n_accepted = (draft_tokens == choice[:, :k]).long().cumprod(-1).sum(-1)  # (B,) matches before the first miss
    return n_accepted, choice.gather(1, n_accepted[:, None]).squeeze(1)  # correction, or the bonus token


def accept_sampling(draft_tokens: torch.Tensor, draft_probs: torch.Tensor,
                    target_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified rejection sampling: the emitted tokens follow ``target_probs`` exactly, whatever the draft.

    ``draft_tokens`` (B, k) were sampled from ``draft_probs`` (B, k, vocab); ``target_probs`` (B, k+1, vocab).
    Returns (accepted count (B,), next token (B,)): the replacement at the first rejection, else the bonus.
    Draws from the global torch RNG.
    """
    batch, k = draft_tokens.shape
    p_draft = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k) p(x_i)
    q_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k) q(x_i) > 0: x_i came from q
    u = torch.rand(p_draft.shape, device=p_draft.device)  # (B, k)
    # Accept x_i with probability min(1, p/q); cumprod turns "accepted so far" into 0 after the first miss,
    # so the sum counts the accepted prefix.
    n_accepted = (u * q_draft <= p_draft).long().cumprod(-1).sum(-1)  # (B,)
    # q = 0 at the bonus position turns max(0, p - q) into p itself: one formula for both cases. After a
    # rejection q(x) > p(x) for the rejected x, so the residual always has some mass left.
    q_padded = torch.cat([draft_probs, torch.zeros_like(target_probs[:, :1])], 1)  # (B, k+1, vocab)
    rows = torch.arange(batch, device=target_probs.device)
    residual = (target_probs - q_padded).clamp(min=0)[rows, n_accepted]  # (B, vocab)
    next_token = torch.multinomial(residual, 1).squeeze(1)  # multinomial renormalises
    return n_accepted, next_token


class Scorer:
    """One model with its KV cache and the sequence's attention mask: scores new tokens, forgets rejected ones."""

    def __init__(self, model, attention_mask: torch.Tensor | None, room: int):
        self.model, self.cache = model, new_cache(model)
        # a left-padded row keeps its zeros; every token after the prompt is real
        self.mask = None if attention_mask is None else torch.cat(
            [attention_mask, attention_mask.new_ones(1, room)], dim=1)  # (1, T + room)

    def scores(self, ids: torch.LongTensor, n: int, processors: Sequence[Processor]) -> torch.Tensor:
        """Run the tokens of ``ids`` (1, L) the cache has not seen; processed scores of the last ``n`` positions,
        each given the ids before it: (1, n, vocab) float32."""
        past = self.cache.get_seq_length()
        mask = None if self.mask is None else self.mask[:, : ids.shape[1]]
        logits = forward(self.model, ids[:, past:], mask, self.cache, logits_to_keep=n).logits
        logits = logits.to(device=ids.device, dtype=torch.float32)  # (1, n, vocab)
        if not processors:
            return logits
        first = ids.shape[1] - n + 1  # the scores at position j follow ids[:, :first + j]
        return torch.stack([apply_processors(processors, ids[:, : first + j], logits[:, j]) for j in range(n)], 1)

    def keep(self, length: int) -> None:
        """Forget cached positions from ``length`` on (the rejected guesses); a shorter cache is left alone."""
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)


def propose(guesser: Scorer, ids: torch.LongTensor, n: int, processors: Sequence[Processor],
            do_sample: bool) -> tuple[torch.LongTensor, torch.Tensor]:
    """The draft model's ``n`` guesses after ``ids`` (1, L), one cheap forward each: tokens (1, n) and the
    processed scores they were chosen from (1, n, vocab), both written into preallocated tensors."""
    tokens = ids.new_zeros(1, n)  # (1, n)
    chosen_from = torch.zeros(1, n, guesser.model.config.vocab_size, device=ids.device)  # (1, n, vocab)
    for i in range(n):
        scores = guesser.scores(torch.cat([ids, tokens[:, :i]], 1), 1, processors)[:, 0]  # (1, vocab)
        chosen_from[:, i] = scores
        tokens[:, i] = torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0] if do_sample else scores.argmax(-1)
    return tokens, chosen_from


@torch.inference_mode()
def speculative_generate(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                         draft, k: int = 4, max_new_tokens: int, processors: Sequence[Processor] = (),
                         do_sample: bool = False, seed: int | None = None, stopping: Sequence[Criterion] = (),
                         eos_token_id=None, pad_token_id=None) -> SpeculativeOutput:
    """Generate with ``draft`` proposing ``k`` tokens and ``model`` (the target) verifying them in one forward.

    ``do_sample=False`` is greedy on the processed scores (the target's own greedy text); ``True`` samples from
    the target's processed distribution (``seed`` seeds the global torch RNG). One sequence (batch 1); inputs
    follow the target, and the draft's tokens follow them.
    """
    run = prepare(model, input_ids, attention_mask, max_new_tokens, stopping, eos_token_id, pad_token_id)
    _check_arguments(model, draft, input_ids, k, max_new_tokens)
    seed_rng(seed)
    ids, prompt_length = run.input_ids, run.input_ids.shape[1]
    target = Scorer(model, run.attention_mask, max_new_tokens + k)
    guesser = Scorer(draft, run.attention_mask, max_new_tokens + k)
    unfinished = torch.ones(1, dtype=torch.bool, device=ids.device)
    proposed = accepted = rejected = target_calls = 0
    if max_new_tokens == 0:
        return SpeculativeOutput(ids, prompt_length, proposed, accepted, rejected, target_calls)
    while True:
        n_drafts = min(k, prompt_length + max_new_tokens - ids.shape[1] - 1)  # never draft past the budget
        drafts, draft_scores = propose(guesser, ids, n_drafts, processors, do_sample)  # (1, n), (1, n, vocab)
        scores = target.scores(torch.cat([ids, drafts], 1), n_drafts + 1, processors)  # (1, n + 1, vocab)
        if do_sample:
            n_accepted, next_token = accept_sampling(drafts, torch.softmax(draft_scores, dim=-1),
                                                     torch.softmax(scores, dim=-1))
        else:
            n_accepted, next_token = accept_greedy(drafts, scores)
        n = int(n_accepted)  # the one host sync per verification step: how many tokens to keep
        target.keep(ids.shape[1] + n)  # both caches keep only the accepted prefix
        guesser.keep(ids.shape[1] + n)
        proposed, accepted, target_calls = proposed + n_drafts, accepted + n, target_calls + 1
        rejected += n < n_drafts
        new = torch.cat([drafts[:, :n], next_token[:, None]], dim=1)  # (1, n + 1)
        for j in range(n + 1):  # append one at a time: a criterion may stop inside the accepted run
            ids, unfinished = append_and_stop(run, ids, new[:, j], unfinished, scores[:, j])
            if not bool(unfinished.any()):
                return SpeculativeOutput(ids, prompt_length, proposed, accepted, rejected, target_calls)


def _check_arguments(model, draft, input_ids: torch.Tensor, k: int, max_new_tokens: int) -> None:
    """After ``prepare`` has checked the prompt for the target: k, the draft's vocabulary and context, batch 1."""
    _check_k(k)
    v_target, v_draft = model.config.vocab_size, draft.config.vocab_size
    if v_target != v_draft:
        raise ValueError(f"draft and target must share one vocabulary (same tokenizer): target has {v_target} "
                         f"tokens, draft has {v_draft}")
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative_generate decodes one sequence at a time: input_ids must be (1, T), got "
                         f"{tuple(input_ids.shape)}; rows of a batch would accept different numbers of draft "
                         f"tokens, so call it once per prompt")
    check_fits(draft, input_ids.shape[1] + max_new_tokens,
               what=f"the prompt ({input_ids.shape[1]} tokens) + max_new_tokens (for the draft)")
