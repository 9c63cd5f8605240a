"""Every forward pass course_lib makes hands the model an attention mask.

Given none, transformers guesses padding from the pad id and prints its four-line "We strongly recommend passing
in an `attention_mask`" warning under the learner's cell. The bundled models (and the tiny test models) use id 0
as pad, BOS and EOS at once, so real text holds the pad id: a prompt after BOS, a generated EOS, the EOS between
two stories. Each case below puts id 0 where transformers looks (the first or the last column).
"""
from __future__ import annotations

import pytest
import torch

from course_lib.decoding import beam_search, contrastive_search, diverse_beam_search, greedy_search, sample
from course_lib.decoding.sampling import next_token_probs
from course_lib.ensembles import Ensemble
from course_lib.decoding.speculative import speculative_generate
from course_lib.metrics import heldout_loss, perplexity
from course_lib.train import make_optimizer, train_step
from tiny_models import make_tiny_model

BOS_PROMPT = torch.tensor([[0, 5, 17, 42, 8]])  # starts with BOS = EOS = pad = 0


@pytest.fixture
def unmasked_calls(tiny_gpt2):
    """The forward calls of tiny_gpt2 that came without an attention mask."""
    calls = []

    def record(module, args, kwargs):
        if kwargs.get("attention_mask") is None:
            calls.append(kwargs.get("input_ids", args[0] if args else None))

    handle = tiny_gpt2.register_forward_pre_hook(record, with_kwargs=True)
    yield calls
    handle.remove()


CASES = {
    "greedy": lambda m: greedy_search(m, BOS_PROMPT, max_new_tokens=4, eos_token_id=[]).sequences,
    "sample": lambda m: sample(m, BOS_PROMPT, max_new_tokens=4, seed=0, eos_token_id=[]).sequences,
    "beam": lambda m: beam_search(m, BOS_PROMPT, num_beams=2, max_new_tokens=4, eos_token_id=[]),
    "diverse beam": lambda m: diverse_beam_search(m, BOS_PROMPT, num_beams=2, num_beam_groups=2,
                                                  diversity_penalty=0.5, max_new_tokens=4, eos_token_id=[]),
    "contrastive": lambda m: contrastive_search(m, BOS_PROMPT, max_new_tokens=4, eos_token_id=[]).sequences,
    "next-token probabilities": lambda m: next_token_probs(m, BOS_PROMPT),
    "ensemble, called directly": lambda m: Ensemble([m, m])(input_ids=BOS_PROMPT),
    "ensemble, generating": lambda m: greedy_search(Ensemble([m, m]), BOS_PROMPT, max_new_tokens=3,
                                                    eos_token_id=[]).sequences,
    "speculative": lambda m: speculative_generate(m, BOS_PROMPT, draft=make_tiny_model("gpt2", seed=1), k=2,
                                                  max_new_tokens=6),
    "perplexity": lambda m: perplexity(m, BOS_PROMPT[0]),
    "held-out loss": lambda m: heldout_loss(m, torch.tensor([0, 3, 4, 0, 5, 6, 0, 7, 8]), context=4),
    "training step": lambda m: train_step(m, make_optimizer(m, 1e-6, 0.0), BOS_PROMPT, BOS_PROMPT, 1e-6, bf16=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_forward_pass_gets_a_mask(tiny_gpt2, unmasked_calls, case):
    state = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    try:
        CASES[case](tiny_gpt2)
    finally:
        tiny_gpt2.load_state_dict(state)  # the training step must not change the shared session model
        tiny_gpt2.eval()
    assert not unmasked_calls, f"{case}: {len(unmasked_calls)} forward passes without an attention mask"

