"""Decoding: one decode stack for transformers models, the from-scratch ``MiniGPT`` and ensembles alike.

Every decoder takes ``fn(model, input_ids, attention_mask=None, *, max_new_tokens, processors=(), stopping=(),
eos_token_id=None, pad_token_id=None, ...)`` and returns a ``GenerateOutput`` (``.sequences`` first):
``steps`` (prefill, decode_step, new_cache), ``prepare`` (checks, EOS/pad, append and stop), ``loop``
(generate), ``search`` (greedy, beam), ``diverse``, ``contrastive``, ``sampling``, ``speculative``, ``fast``
(the no-sync greedy loop), with ``processors`` and ``stopping`` as the rules they share.
"""

from course_lib.decoding.contrastive import contrastive_search
from course_lib.decoding.diverse import diverse_beam_search
from course_lib.decoding.fast import greedy_no_sync, greedy_without_cache
from course_lib.decoding.loop import generate, greedy_select
from course_lib.decoding.prepare import GenerateOutput
from course_lib.decoding.processors import (
    FrequencyPresencePenalty, MinP, NoRepeatNGram, RepetitionPenalty, Temperature, TopK, TopP, TypicalP,
    apply_processors,
)
from course_lib.decoding.sampling import KeptCounter, next_token_probs, sample, sample_select, sampling_processors
from course_lib.decoding.search import BeamSearchOutput, beam_search, greedy_search
from course_lib.decoding.speculative import SpeculativeOutput, speculative_generate
from course_lib.decoding.steps import decode_step, new_cache, prefill
from course_lib.decoding.stopping import EosStop, MaxNewTokens, StopStrings, TimeLimit
