"""Diverse (group) beam search (Vijayakumar et al. 2016, "Diverse Beam Search", arXiv:1610.02424).

Plain beam search returns near-copies of one sentence. Diverse beam search splits the ``num_beams`` beams
into ``num_beam_groups`` groups that search one after the other at every step; a group pays
``diversity_penalty`` for each time an earlier group already chose a token at this step (Hamming diversity):

    log p(v) - diversity_penalty * (times v was picked by earlier groups at this step)

Group 0 is never penalised, so it is exactly beam search with ``num_beams // num_beam_groups`` beams. As in
transformers 4.x, the penalised log-probabilities accumulate into a hypothesis's score, and the answer is
the best finished hypotheses over all groups. transformers 5.x moved this to a hub repository that needs
``trust_remote_code=True``; this version runs offline.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from course_lib.checks import check_arg, is_integer, is_number
from course_lib.decoding.beam import BeamConfig, beam_step, best_hypotheses, gather, init_beams, search_done
from course_lib.decoding.processors import Processor, apply_processors
from course_lib.decoding.search import BeamDecoder, BeamSearchOutput, check_beam_args, start_search
from course_lib.decoding.stopping import Criterion, any_stop


def hamming_penalty(earlier_tokens: torch.LongTensor, vocab_size: int, diversity_penalty: float) -> torch.Tensor:
    """(B, n) tokens chosen by earlier groups this step -> (B, vocab) amount to subtract from log-probs."""
    counts = torch.zeros(earlier_tokens.shape[0], vocab_size, device=earlier_tokens.device)
    counts.scatter_add_(1, earlier_tokens, torch.ones_like(earlier_tokens, dtype=counts.dtype))
    return diversity_penalty * counts


def _check_groups(num_beams, num_beam_groups, diversity_penalty) -> None:
    check_arg("num_beam_groups", num_beam_groups,
          is_integer(num_beam_groups) and num_beam_groups >= 1 and num_beams % num_beam_groups == 0,
          f"a divisor of num_beams={num_beams}")
    check_arg("diversity_penalty", diversity_penalty, is_number(diversity_penalty) and diversity_penalty >= 0,
          "a number >= 0")


@torch.inference_mode()
def diverse_beam_search(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                        num_beams: int, num_beam_groups: int, diversity_penalty: float, max_new_tokens: int,
                        length_penalty: float = 1.0, early_stopping: bool | str = False,
                        num_return_sequences: int = 1, processors: Sequence[Processor] = (),
                        stopping: Sequence[Criterion] = (), eos_token_id=None,
                        pad_token_id=None) -> BeamSearchOutput:
    """Beam search in ``num_beam_groups`` groups pushed apart by a Hamming ``diversity_penalty``.

    Returns the ``num_return_sequences`` best finished hypotheses over all groups, best first.
    """
    check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping)
    _check_groups(num_beams, num_beam_groups, diversity_penalty)
    run, fill, nothing_to_do = start_search(model, input_ids, attention_mask, max_new_tokens, num_return_sequences,
                                            stopping, eos_token_id, pad_token_id)
    if nothing_to_do is not None:
        return nothing_to_do
    B, T = run.input_ids.shape
    S = num_beams // num_beam_groups  # beams per group
    config = BeamConfig(S, T, T + max_new_tokens, float(length_penalty), early_stopping, len(run.eos))
    groups = [init_beams(run.input_ids, config, fill) for _ in range(num_beam_groups)]
    decoder = BeamDecoder(model, run.input_ids, run.attention_mask, num_beams)  # rows b*K + g*S + s
    stop = functools.partial(any_stop, run.criteria)

    for cur_len in range(T, T + max_new_tokens):
        log_probs = torch.log_softmax(decoder.logits, dim=-1).view(B, num_beam_groups, S, -1)  # (B, G, S, V)
        parents, chosen = [], []
        for g, beams in enumerate(groups):
            running_ids = beams.running[:, :, :cur_len].flatten(0, 1)  # (B*S, cur_len)
            group_log_probs = apply_processors(processors, running_ids, log_probs[:, g].flatten(0, 1)).view(B, S, -1)
            if chosen:  # tokens the earlier groups just picked cost extra
                group_log_probs = group_log_probs - hamming_penalty(torch.cat(chosen, 1), group_log_probs.shape[-1],
                                                                    diversity_penalty)[:, None, :]
            group_parents, _ = beam_step(beams, group_log_probs, cur_len, config, stop)
            parents.append(group_parents + g * S)  # index among the prompt's K cache rows
            chosen.append(beams.running[:, :, cur_len])  # (B, S)
        if all(search_done(beams, config) for beams in groups):
            break
        decoder.advance(torch.cat(parents, dim=1), torch.cat([b.running for b in groups], dim=1), cur_len)
    return _best_over_groups(groups, T, num_return_sequences)


def _best_over_groups(groups, prompt_len: int, num_return_sequences: int) -> BeamSearchOutput:
    """Rank every group's finished hypotheses together and keep the best ``num_return_sequences`` per prompt."""
    scores = torch.cat([b.finished_scores for b in groups], dim=1)  # (B, K)
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, K): group 0 first among equals
    merged = [gather(torch.cat([getattr(b, name) for b in groups], dim=1), order)
              for name in ("finished", "finished_scores", "finished_len")]
    return BeamSearchOutput(*best_hypotheses(*merged, prompt_len, num_return_sequences))
