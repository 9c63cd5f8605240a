"""Search decoding: greedy search and beam search, token for token what ``model.generate`` does.

    ids = greedy_search(model, input_ids, attention_mask, max_new_tokens=40).sequences   # (B, T + 40)
    out = beam_search(model, input_ids, attention_mask, num_beams=4, max_new_tokens=40, length_penalty=1.0,
                      early_stopping=False, num_return_sequences=2)
    out.sequences, out.scores        # (B * 2, T + new) ids, (B * 2,) length-penalised log-probabilities
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from course_lib.checks import check_arg, is_integer, is_number
from course_lib.decoding.beam import BeamConfig, StepRecord, beam_step, best_hypotheses, init_beams, search_done
from course_lib.decoding.loop import generate, greedy_select
from course_lib.decoding.prepare import GenerateOutput, Prepared, grow, prepare
from course_lib.decoding.processors import Processor, apply_processors
from course_lib.decoding.steps import decode_step, new_cache, prefill
from course_lib.decoding.stopping import Criterion, any_stop
from course_lib.devices import to_model_device


def greedy_search(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                  max_new_tokens: int, processors: Sequence[Processor] = (), stopping: Sequence[Criterion] = (),
                  eos_token_id=None, pad_token_id=None) -> GenerateOutput:
    """Always take the most likely next token: (B, T) -> (B, T + new). Deterministic, and prone to loops."""
    return generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, processors=processors,
                    select=greedy_select, stopping=stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@dataclass
class BeamSearchOutput(GenerateOutput):
    """What beam search returns: ``sequences`` (B * R, T + new), the R best hypotheses per prompt, best first,
    and their ``scores``, transformers' ``sequences_scores``."""

    scores: torch.Tensor  # (B * R,) sum of token log-probs / new_len ** length_penalty
    tree: list[StepRecord] | None = None  # every step's candidates, when asked for (record_tree=True)


def check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping) -> None:
    """Clear errors for the beam settings transformers would refuse (or silently misuse)."""
    check_arg("num_beams", num_beams, is_integer(num_beams) and num_beams >= 1, "an integer >= 1")
    check_arg("num_return_sequences", num_return_sequences,
          is_integer(num_return_sequences) and 1 <= num_return_sequences <= num_beams,
          f"an integer between 1 and num_beams={num_beams}: beam search only keeps num_beams hypotheses")
    check_arg("length_penalty", length_penalty, is_number(length_penalty),
          "a finite number (> 0 favours longer hypotheses, < 0 shorter ones)")
    check_arg("early_stopping", early_stopping, isinstance(early_stopping, bool) or early_stopping == "never",
          "True, False or 'never'")


class BeamDecoder:
    """The model side of beam search: a KV cache for B * K rows, reordered to follow the surviving beams.

    ``attention_mask`` is None when no prompt is padded (``drop_full_mask`` decides that before the move).
    """

    def __init__(self, model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, num_beams: int):
        input_ids, mask = to_model_device(model, input_ids, attention_mask)
        self.model, self.K = model, num_beams
        self.cache = new_cache(model)
        self.mask = None if mask is None else mask.repeat_interleave(num_beams, dim=0)  # (B*K, T)
        self.logits = prefill(model, input_ids.repeat_interleave(num_beams, dim=0), self.mask, cache=self.cache)

    def advance(self, parents: torch.LongTensor, running: torch.LongTensor, cur_len: int) -> None:
        """Reorder the cache so row b*K + k holds beam k's parent, then feed each beam's newest token."""
        B = parents.shape[0]
        offsets = torch.arange(B, device=parents.device)[:, None] * self.K
        self.cache.reorder_cache((parents + offsets).flatten())  # (B*K,)
        self.mask = grow(self.mask)
        newest = running[:, :, cur_len].reshape(-1, 1)  # (B*K, 1)
        self.logits = decode_step(self.model, newest, self.mask, cache=self.cache)


def start_search(model, input_ids, attention_mask, max_new_tokens, num_return_sequences, stopping, eos_token_id,
                 pad_token_id) -> tuple[Prepared, int, BeamSearchOutput | None]:
    """``prepare``, the id that fills ended hypotheses, and the output for ``max_new_tokens=0`` (else None):
    each prompt, ``num_return_sequences`` times, with score 0."""
    run = prepare(model, input_ids, attention_mask, max_new_tokens, stopping, eos_token_id, pad_token_id)
    fill = run.pad if run.pad is not None else (run.eos[0] if run.eos else -1)  # what follows an ended hypothesis
    if max_new_tokens > 0:
        return run, fill, None
    prompts = run.input_ids.repeat_interleave(num_return_sequences, dim=0)  # (B * R, T)
    return run, fill, BeamSearchOutput(prompts, torch.zeros(prompts.shape[0], device=prompts.device))


@torch.inference_mode()
def beam_search(model, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                num_beams: int, max_new_tokens: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, num_return_sequences: int = 1,
                processors: Sequence[Processor] = (), stopping: Sequence[Criterion] = (),
                eos_token_id=None, pad_token_id=None, record_tree: bool = False) -> BeamSearchOutput:
    """Keep the ``num_beams`` most probable partial sequences at every step (Graves 2012, arXiv:1211.3711).

    ``length_penalty`` > 0 favours longer finished hypotheses, < 0 shorter ones. ``early_stopping``: True
    stops a prompt once it has ``num_beams`` finished hypotheses; False stops when a heuristic says no
    running beam can still win; "never" only when none can win in principle (the canonical algorithm).
    """
    check_beam_args(num_beams, num_return_sequences, length_penalty, early_stopping)
    run, fill, nothing_to_do = start_search(model, input_ids, attention_mask, max_new_tokens, num_return_sequences,
                                            stopping, eos_token_id, pad_token_id)
    if nothing_to_do is not None:
        return nothing_to_do
    B, T = run.input_ids.shape
    config = BeamConfig(num_beams, T, T + max_new_tokens, float(length_penalty), early_stopping, len(run.eos))
    beams = init_beams(run.input_ids, config, fill)
    decoder = BeamDecoder(model, run.input_ids, run.attention_mask, num_beams)
    tree = [] if record_tree else None

    for cur_len in range(T, T + max_new_tokens):
        running_ids = beams.running[:, :, :cur_len].flatten(0, 1)  # (B*K, cur_len)
        log_probs = apply_processors(processors, running_ids, torch.log_softmax(decoder.logits, dim=-1))  # (B*K, V)
        parents, record = beam_step(beams, log_probs.view(B, num_beams, -1), cur_len, config,
                                    functools.partial(any_stop, run.criteria))
        if tree is not None:
            tree.append(record)
        if search_done(beams, config):
            break
        decoder.advance(parents, beams.running, cur_len)
    best = best_hypotheses(beams.finished, beams.finished_scores, beams.finished_len, T, num_return_sequences)
    return BeamSearchOutput(*best, tree=tree)
