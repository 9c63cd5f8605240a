"""Decoding: the decode loop in small steps, stopping criteria, search (greedy, beam, contrastive, diverse),
and sampling with logits processors (temperature, top-k, top-p, min-p, typical-p, penalties)."""

from course_lib.decoding.contrastive import contrastive_search
from course_lib.decoding.diverse import diverse_beam_search
from course_lib.decoding.loop import decode_step, generate, greedy_select, new_cache, prefill
from course_lib.decoding.search import BeamSearchOutput, beam_search, greedy_search
from course_lib.decoding.stopping import EosStop, MaxNewTokens, StopStrings, TimeLimit
from course_lib.decoding.processors import (
    FrequencyPresencePenalty, MinP, NoRepeatNGram, RepetitionPenalty, Temperature, TopK, TopP, TypicalP,
    apply_processors,
)
from course_lib.decoding.sampling import KeptCounter, next_token_probs, sample, sample_select, sampling_processors
