"""Speculative decoding from scratch: a cheap draft guesses k tokens, the target checks them in ONE forward.

Leviathan et al. 2023 (arXiv:2211.17192) and Chen et al. 2023 (arXiv:2302.01318). At batch 1 a decode step
costs about the same for 1 or k+1 tokens (the weights are read once either way), so every draft token the
target agrees with is a token for free. Each verification step emits between 1 and k+1 tokens:

    out = speculative_generate(target, draft, input_ids, max_new_tokens=64, k=4)
    out.sequences, out.acceptance_rate

Greedy (temperature 0) gives exactly the target's own greedy text. Sampling keeps exactly the target's
distribution: draft token x is accepted with probability min(1, p(x)/q(x)); at the first rejection the
replacement is drawn from max(0, p - q) renormalised; after k acceptances a bonus token comes from p.
Batch size 1 only: rows of a batch would accept different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from course_lib.checks import check, is_integer, is_number
from course_lib.decoding.loop import no_padding_mask
from course_lib.devices import to_model_device
from course_lib.models import check_fits, check_token_ids


@dataclass
class SpeculativeOutput:
    """The generated ids plus the bookkeeping that explains the speed-up."""

    sequences: torch.Tensor  # (1, prompt + new)
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
    check("c", c, is_number(c) and c >= 0, "a number >= 0 (one draft forward's cost, in target forwards)")
    return expected_tokens_per_step(alpha, k) / (k * c + 1)


def _check_k(k: int) -> None:
    check("k", k, is_integer(k) and k >= 1, "an integer >= 1 (draft tokens per step)")


def _check_alpha_k(alpha: float, k: int) -> None:
    check("alpha", alpha, is_number(alpha) and 0.0 <= alpha <= 1.0, "an acceptance rate in [0, 1]")
    _check_k(k)


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep draft tokens while they equal the target's argmax; then take the target's own choice.

    ``draft_tokens`` (B, k), ``target_logits`` (B, k+1, vocab). Returns (accepted count (B,), next token (B,)).
    """
    k = draft_tokens.shape[1]
    choice = target_logits.argmax(-1)  # (B, k+1)
    n_accepted = (draft_tokens == choice[:, :k]).long().cumprod(-1).sum(-1)  # (B,) matches before the first miss
    return n_accepted, choice.gather(1, n_accepted[:, None]).squeeze(1)  # correction, or the bonus token


def accept_sampling(draft_tokens: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Modified rejection sampling: the emitted tokens follow ``target_probs`` exactly, whatever the draft.

    ``draft_tokens`` (B, k) were sampled from ``draft_probs`` (B, k, vocab); ``target_probs`` (B, k+1, vocab).
    Returns (accepted count (B,), next token (B,)): the replacement at the first rejection, else the bonus.
    """
    batch, k = draft_tokens.shape
    p_draft = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k) p(x_i)
    q_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # (B, k) q(x_i) > 0: x_i came from q
    u = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)  # (B, k)
    n_accepted = (u * q_draft <= p_draft).long().cumprod(-1).sum(-1)  # (B,) accept with prob min(1, p/q)
    # q = 0 at the bonus position turns max(0, p - q) into p itself: one formula for both cases. After a
    # rejection q(x) > p(x) for the rejected x, so the residual always has some mass left.
    q_padded = torch.cat([draft_probs, torch.zeros_like(target_probs[:, :1])], 1)  # (B, k+1, vocab)
    rows = torch.arange(batch, device=target_probs.device)
    residual = (target_probs - q_padded).clamp(min=0)[rows, n_accepted]  # (B, vocab)
    next_token = torch.multinomial(residual, 1, generator=generator).squeeze(1)  # multinomial renormalises
    return n_accepted, next_token


def _extend(model, sequence: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run ``model`` on the tokens its cache has not seen yet; returns their logits (1, T_new, vocab)."""
    past = cache.get_seq_length()
    new = sequence[:, past:]  # (1, T_new): the whole prompt at first, then 1-2 tokens
    # the mask: a drafted EOS (also the pad id) is text, and without a mask transformers warns that it may be padding
    return model(input_ids=new, attention_mask=no_padding_mask(new, past), cache=cache, use_cache=True).logits.float()


def _crop(cache: DynamicCache, length: int) -> None:
    """Forget cached positions from ``length`` on (the rejected guesses)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def propose(draft, sequence: torch.Tensor, cache: DynamicCache, k: int, temperature: float,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft's k guesses, one cheap forward each: tokens (1, k) and, when sampling, their q (1, k, vocab)."""
    sequence = to_model_device(draft, sequence)
    tokens, probs = [sequence[:, :0]], []
    for _ in range(k):
        logits = _extend(draft, torch.cat([sequence, *tokens], 1), cache)[:, -1]  # (1, vocab)
        if temperature == 0:
            tokens.append(logits.argmax(-1, keepdim=True))  # (1, 1); greedy never needs q
        else:
            probs.append(torch.softmax(logits / temperature, -1))  # (1, vocab)
            tokens.append(torch.multinomial(probs[-1], 1, generator=generator))  # (1, 1)
    return torch.cat(tokens, 1), torch.stack(probs, 1) if probs else None


@torch.inference_mode()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, k: int = 4,
                         temperature: float = 0.0, eos_token_id: int | None = None,
                         generator: torch.Generator | None = None) -> SpeculativeOutput:
    """Generate with ``draft`` proposing ``k`` tokens and ``target`` verifying them in one forward.

    ``temperature`` 0 is greedy (identical to the target's greedy output); > 0 samples from the target's
    softmax(logits / temperature). Stops after ``max_new_tokens`` or at ``eos_token_id``. Batch size 1.
    Inputs follow the target; the draft must sit on the same device.
    """
    _check_arguments(target, draft, input_ids, max_new_tokens, k, temperature)
    input_ids = to_model_device(target, input_ids)
    prompt_length = input_ids.shape[1]
    sequence = input_ids
    target_cache, draft_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    proposed = accepted = rejected = target_calls = 0
    while sequence.shape[1] - prompt_length < max_new_tokens:
        n_drafts = min(k, max_new_tokens - (sequence.shape[1] - prompt_length) - 1)  # never overshoot the budget
        drafts, q = propose(draft, sequence, draft_cache, n_drafts, temperature, generator)  # (1, n), (1, n, V)
        target_logits = _extend(target, torch.cat([sequence, drafts], 1), target_cache)[:, -(n_drafts + 1):]
        if temperature == 0:
            n_accepted, next_token = accept_greedy(drafts, target_logits)
        else:
            p = torch.softmax(target_logits / temperature, -1)  # (1, n+1, vocab)
            q = q if q is not None else p[:, :0]  # no draft tokens this step (budget end): bonus only
            n_accepted, next_token = accept_sampling(drafts, q, p, generator)
        n = int(n_accepted)  # the one host sync per verification step: how many tokens to keep
        kept = sequence.shape[1] + n
        sequence = torch.cat([sequence, drafts[:, :n], next_token[:, None]], 1)  # (1, T + n + 1)
        _crop(target_cache, kept)  # both caches keep only the accepted prefix
        _crop(draft_cache, kept)
        proposed, accepted, target_calls = proposed + n_drafts, accepted + n, target_calls + 1
        rejected += n < n_drafts
        # With an EOS id, a second sync per step: did this step emit the EOS?
        if eos_token_id is not None and (sequence[0, kept - n:] == eos_token_id).any():
            new = sequence[0, prompt_length:]
            sequence = sequence[:, : prompt_length + int((new == eos_token_id).nonzero()[0]) + 1]
            break
    return SpeculativeOutput(sequence, prompt_length, proposed, accepted, rejected, target_calls)


def _check_arguments(target, draft, input_ids: torch.Tensor, max_new_tokens: int, k: int, temperature: float) -> None:
    _check_k(k)
    check("max_new_tokens", max_new_tokens, is_integer(max_new_tokens) and max_new_tokens >= 1, "an integer >= 1")
    check("temperature", temperature, is_number(temperature) and temperature >= 0, "a number >= 0 (0 = greedy)")
    v_target, v_draft = target.config.vocab_size, draft.config.vocab_size
    if v_target != v_draft:
        raise ValueError(f"draft and target must share one vocabulary (same tokenizer): target has {v_target} "
                         f"tokens, draft has {v_draft}")
    check_token_ids(target, input_ids)
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, T) (batch size 1), got {tuple(input_ids.shape)}")
    for model in (target, draft):
        check_fits(model, input_ids.shape[1] + max_new_tokens,
                   what=f"the prompt ({input_ids.shape[1]} tokens) + max_new_tokens")
