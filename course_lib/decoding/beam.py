"""The bookkeeping of beam search, one step at a time, with the exact rules of ``transformers``' beam search.

Per prompt the search keeps two lists of ``K = num_beams`` hypotheses:
- running beams: still growing, ranked by their cumulative log-probability;
- finished hypotheses: ended by EOS (or another stopping criterion), ranked by their length-penalised score
  ``sum(log p) / new_len ** length_penalty``.
Each step extends every running beam by every token, keeps the best ``2K`` candidates (so that K of them
survive even if K just ended), moves finished candidates among the top K into the finished list, and keeps
the best K unfinished ones running. ``early_stopping`` decides when no running beam can still win.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG = -1.0e9  # the "impossible" score used by transformers to mask slots out of a top-k


def gather(tensor: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """Pick slots along dim 1: tensor (B, n, ...) and index (B, m) -> (B, m, ...)."""
    return torch.take_along_dim(tensor, index.reshape(index.shape + (1,) * (tensor.ndim - 2)), dim=1)


@dataclass
class BeamConfig:
    """The settings that decide which hypotheses win and when the search ends."""

    num_beams: int
    prompt_len: int
    max_length: int  # prompt_len + max_new_tokens
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_eos: int = 1  # more EOS ids need more spare candidates

    @property
    def candidates(self) -> int:
        return max(2, 1 + self.num_eos) * self.num_beams


@dataclass
class Beams:
    """The search state of a batch of B prompts with K beams each; L = max_length."""

    running: torch.LongTensor  # (B, K, L) ids of the live hypotheses, filled up to the current length
    running_scores: torch.Tensor  # (B, K) their cumulative log-probabilities; NEG marks an empty slot
    finished: torch.LongTensor  # (B, K, L) best finished hypotheses so far
    finished_scores: torch.Tensor  # (B, K) their length-penalised scores, best first; NEG = empty slot
    finished_len: torch.LongTensor  # (B, K) new tokens in each finished hypothesis
    is_finished: torch.BoolTensor  # (B, K) slot holds a real finished hypothesis
    improvable: torch.BoolTensor  # (B, 1) a running beam may still beat the finished ones
    all_candidates_stop: bool = False  # every candidate of the last step hit a stopping criterion


def init_beams(input_ids: torch.LongTensor, config: BeamConfig, fill_id: int) -> Beams:
    """Start from the prompts (B, T): K copies each, but only beam 0 alive, so step 1 does not pick the
    same token K times."""
    B, T = input_ids.shape
    running = torch.full((B, config.num_beams, config.max_length), fill_id, dtype=torch.long, device=input_ids.device)
    running[:, :, :T] = input_ids[:, None, :]
    scores = torch.zeros(B, config.num_beams, device=input_ids.device)
    scores[:, 1:] = NEG
    return Beams(running=running, running_scores=scores, finished=running.clone(),
                 finished_scores=torch.full_like(scores, NEG), finished_len=torch.zeros_like(running[:, :, 0]),
                 is_finished=torch.zeros_like(scores, dtype=torch.bool),
                 improvable=torch.ones(B, 1, dtype=torch.bool, device=input_ids.device))


def top_candidates(beams: Beams, log_probs: torch.Tensor, cur_len: int, n: int):
    """The ``n`` best one-token extensions over all beams of each prompt.

    ``log_probs`` (B, K, V) are this step's (processed) token log-probabilities. Returns their cumulative
    scores (B, n), the extended sequences (B, n, L) and the index of the beam each one extends (B, n).
    """
    B, K, V = log_probs.shape
    total = (log_probs + beams.running_scores[:, :, None]).reshape(B, K * V)  # (B, K*V)
    scores, flat = torch.topk(total, k=n)  # (B, n), sorted best first
    parent, token = flat // V, flat % V  # which beam, which token
    sequences = gather(beams.running, parent)  # (B, n, L)
    sequences[:, :, cur_len] = token
    return scores, sequences, parent


def keep_running(beams: Beams, scores, sequences, stops: torch.BoolTensor, K: int) -> torch.LongTensor:
    """The best K candidates that did not stop become the running beams; returns which candidates (B, K)."""
    live = scores + stops.float() * NEG  # (B, n): stopped candidates cannot keep running
    keep = torch.topk(live, k=K).indices  # (B, K)
    beams.running = gather(sequences, keep)
    beams.running_scores = gather(live, keep)
    return keep


def add_finished(beams: Beams, scores, sequences, stops: torch.BoolTensor, cur_len: int, config: BeamConfig) -> None:
    """Candidates among the top K that stopped join the finished list if they beat its worst member."""
    K, new_len = config.num_beams, cur_len + 1 - config.prompt_len
    full = beams.is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)  # (B, 1)
    # As transformers decides: a candidate enters when it stopped, is among the top K (the others are only
    # spares for the running list), its prompt can still improve, and (early_stopping=True) the list is not full.
    in_top_k = torch.arange(stops.shape[1], device=stops.device) < K  # (n,)
    enters = stops & in_top_k & beams.improvable & ~full  # (B, n)
    penalised = scores / (new_len ** config.length_penalty)  # (B, n)
    penalised = penalised.masked_fill(~enters, -float("inf"))  # below every slot, even an empty one (NEG)

    best = torch.topk(torch.cat([beams.finished_scores, penalised], dim=1), k=K).indices  # (B, K) of K + n
    beams.finished = gather(torch.cat([beams.finished, sequences], dim=1), best)
    beams.finished_scores = gather(torch.cat([beams.finished_scores, penalised], dim=1), best)
    new_lens = torch.full_like(stops, new_len, dtype=torch.long)
    beams.finished_len = gather(torch.cat([beams.finished_len, new_lens], dim=1), best)
    beams.is_finished = gather(torch.cat([beams.is_finished, enters], dim=1), best)


def update_improvable(beams: Beams, cur_len: int, config: BeamConfig) -> None:
    """Can the best running beam still beat the worst finished one? ``early_stopping`` picks the estimate:
    False and True use the current length; "never" with a positive length penalty assumes the beam runs to
    ``max_length`` (the best case when longer means better)."""
    if config.early_stopping == "never" and config.length_penalty > 0.0:
        best_len = config.max_length - config.prompt_len
    else:
        best_len = cur_len - config.prompt_len
    best_running = beams.running_scores[:, :1] / (best_len ** config.length_penalty)  # (B, 1)
    worst_finished = torch.where(beams.is_finished, beams.finished_scores.min(dim=1, keepdim=True).values, NEG)
    beams.improvable &= (best_running > worst_finished).any(dim=-1, keepdim=True)


@dataclass
class StepRecord:
    """The candidates of one beam step (for the search-tree picture), each (B, n) with n = 2K."""

    tokens: torch.LongTensor  # the token each candidate appends
    scores: torch.Tensor  # its cumulative log-probability
    parents: torch.LongTensor  # the running beam (slot of the previous step) it extends
    kept_as: torch.LongTensor  # the running slot it occupies from now on, -1 if it does not keep running
    stopped: torch.BoolTensor  # it hit EOS or another stopping criterion


def beam_step(beams: Beams, log_probs: torch.Tensor, cur_len: int, config: BeamConfig, stopping) -> tuple:
    """One step of beam search for all prompts. ``log_probs``: (B, K, V), processed; ``stopping(ids, scores)
    -> (B*n,)`` bools, given each candidate's ids and the processed log-probs it was chosen from.

    Returns the beam each new running beam extends (B, K), to reorder the KV cache with, and a
    ``StepRecord`` of this step's candidates.
    """
    B, K = log_probs.shape[:2]
    scores, sequences, parent = top_candidates(beams, log_probs, cur_len, config.candidates)
    candidate_scores = gather(log_probs, parent).flatten(0, 1)  # (B*n, V): the parent beam's log-probs
    stops = stopping(sequences[:, :, : cur_len + 1].flatten(0, 1), candidate_scores).reshape(B, -1)  # (B, n)
    keep = keep_running(beams, scores, sequences, stops, K)  # (B, K)
    add_finished(beams, scores, sequences, stops, cur_len, config)
    beams.all_candidates_stop = bool(stops.all())  # host sync, once per step
    update_improvable(beams, cur_len + 1, config)

    kept_as = torch.full_like(parent, -1).scatter_(1, keep, torch.arange(K, device=keep.device).expand(B, K))
    record = StepRecord(sequences[:, :, cur_len], scores, parent, kept_as, stops)
    return gather(parent, keep), record


def search_done(beams: Beams, config: BeamConfig) -> bool:
    """The whole search ends when no prompt can improve, or (early_stopping=True) every prompt has K
    finished hypotheses, or every candidate just hit a stopping criterion (e.g. max_length)."""
    all_full = bool(beams.is_finished.all()) and config.early_stopping is True
    return not bool(beams.improvable.any()) or all_full or beams.all_candidates_stop


def best_hypotheses(finished: torch.LongTensor, scores: torch.Tensor, lengths: torch.LongTensor, prompt_len: int,
                    num_return_sequences: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """The first ``num_return_sequences`` of ranked finished hypotheses (B, K, L) with their scores and new
    lengths (B, K), cropped to the longest one returned: sequences (B * R, prompt + new), scores (B * R,)."""
    R = num_return_sequences
    new_len = int(lengths[:, :R].max())
    return finished[:, :R, : prompt_len + new_len].flatten(0, 1), scores[:, :R].flatten()
