"""One contract for every decoder, on a transformers model and on the from-scratch MiniGPT alike, and the
decode stacks pinned together: transformers' greedy generate == the course loop on MiniGPT == greedy
speculative decoding, token for token, with and without left padding."""
from __future__ import annotations

import inspect
import typing

import pytest
import torch

from course_lib.decoding import (GenerateOutput, beam_search, contrastive_search, diverse_beam_search,
                                 greedy_no_sync, greedy_search, greedy_without_cache, sample, speculative_generate)
from course_lib.minigpt import MiniGPT
from course_lib.models import load_model
from tiny_models import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

DECODERS = {  # every decoder with the settings that make it run on a tiny model
    "greedy_search": (greedy_search, {}),
    "sample": (sample, dict(seed=0, top_k=5)),
    "beam_search": (beam_search, dict(num_beams=2)),
    "diverse_beam_search": (diverse_beam_search, dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5)),
    "contrastive_search": (contrastive_search, dict(top_k=3)),
    "speculative_generate": (speculative_generate, dict(k=2)),  # drafts with the target itself (see run)
}
FAST = {"greedy_no_sync": greedy_no_sync, "greedy_without_cache": greedy_without_cache}
ONE_ROW = {"speculative_generate"}  # decodes one sequence at a time
PAD = 0


def run(name, model, ids, mask, **kw):
    decoder, settings = DECODERS[name]
    if name == "speculative_generate":
        settings = dict(settings, draft=model)
    return decoder(model, ids, mask, **settings, **kw)


@pytest.fixture(scope="module", params=["transformers", "MiniGPT"])
def model(request):
    hf = make_tiny_model("gpt2")
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = 7, PAD
    return hf if request.param == "transformers" else MiniGPT.from_hf(hf)


def batch(name):
    """Two left-padded prompts and their mask (one prompt for the one-row decoder)."""
    ids = torch.tensor([[PAD, PAD, 5, 6, 9], [3, 4, 5, 6, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return (ids[:1], mask[:1]) if name in ONE_ROW else (ids, mask)


@pytest.mark.parametrize("name", [*DECODERS, *FAST])
def test_one_calling_convention(name):
    decoder = DECODERS[name][0] if name in DECODERS else FAST[name]
    params = inspect.signature(decoder).parameters
    assert list(params)[:3] == ["model", "input_ids", "attention_mask"]
    assert params["attention_mask"].default is None
    assert params["max_new_tokens"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["max_new_tokens"].default is inspect.Parameter.empty
    if name in DECODERS:
        for keyword, default in dict(processors=(), stopping=(), eos_token_id=None, pad_token_id=None).items():
            assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY and params[keyword].default == default
    assert issubclass(typing.get_type_hints(decoder)["return"], GenerateOutput)


@pytest.mark.parametrize("name", DECODERS)
def test_inputs_stay_unchanged_and_the_output_starts_with_the_prompt(model, name):
    ids, mask = batch(name)
    ids_before, mask_before = ids.clone(), mask.clone()
    out = run(name, model, ids, mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(ids, ids_before) and torch.equal(mask, mask_before)
    assert isinstance(out, GenerateOutput) and out.sequences.dtype == torch.long
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + 6)  # no EOS: exactly max_new_tokens
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("name", [*DECODERS, *FAST])
def test_max_new_tokens_zero_returns_the_prompt(model, name):
    ids, mask = batch(name)
    out = run(name, model, ids, mask, max_new_tokens=0) if name in DECODERS else FAST[name](
        model, ids, mask, max_new_tokens=0)
    assert torch.equal(out.sequences, ids)


@pytest.mark.parametrize("name", DECODERS)
def test_none_means_the_generation_config_and_an_empty_list_means_no_eos(model, name):
    ids, mask = batch(name)
    default = run(name, model, ids, mask, max_new_tokens=8)
    explicit = run(name, model, ids, mask, max_new_tokens=8, eos_token_id=7, pad_token_id=PAD)
    assert torch.equal(default.sequences, explicit.sequences)
    assert run(name, model, ids, mask, max_new_tokens=8, eos_token_id=[]).sequences.shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("name", [n for n in DECODERS if "beam" not in n])
def test_a_row_that_meets_eos_stops_and_is_padded(model, name):
    ids, mask = batch(name)
    free = run(name, model, ids, mask, max_new_tokens=8, eos_token_id=[]).sequences
    T = ids.shape[1]
    eos = int(free[0, T + 2])  # row 0's third new token becomes the EOS id
    out = run(name, model, ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=PAD).sequences
    new = out[:, T:]
    first = int((new[0] == eos).nonzero()[0])  # row 0 meets EOS at the latest at its third token
    assert first <= 2 and torch.equal(out[0, : T + first + 1], free[0, : T + first + 1])
    for row in new:  # after a row's first EOS, only padding
        hits = (row == eos).nonzero()
        if len(hits):
            assert (row[int(hits[0]) + 1 :] == PAD).all()


@pytest.mark.parametrize("name", ["beam_search", "diverse_beam_search"])
def test_beam_hypotheses_end_at_eos_and_are_padded(model, name):
    ids, mask = batch(name)
    out = run(name, model, ids, mask, max_new_tokens=8, eos_token_id=[9, 7], num_return_sequences=2)
    assert out.sequences.shape[0] == 2 * ids.shape[0] and out.scores.shape == (2 * ids.shape[0],)
    for row in out.sequences[:, ids.shape[1] :]:
        hits = torch.isin(row, torch.tensor([9, 7])).nonzero()
        if len(hits):
            assert (row[int(hits[0]) + 1 :] == PAD).all()


@pytest.mark.parametrize("name", DECODERS)
def test_criteria_receive_the_processed_scores(model, name):
    ids, mask = batch(name)
    seen = []

    def watch(input_ids, scores):
        seen.append(scores)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def only_token_4(input_ids, scores):  # a processor that leaves one token possible
        return torch.full_like(scores, -float("inf")).index_fill(1, torch.tensor([4]), 0.0)

    out = run(name, model, ids, mask, max_new_tokens=3, eos_token_id=[], processors=[only_token_4], stopping=[watch])
    assert seen and all(isinstance(s, torch.Tensor) and s.shape[-1] == 97 for s in seen)
    assert all(torch.isinf(s[:, :4]).all() and torch.isfinite(s[:, 4]).all() for s in seen)
    assert (out.sequences[:, ids.shape[1] :] == 4).all()


# ----------------------------------------------------------------------------- the stacks, pinned together


@pytest.fixture(scope="module")
def stories():
    """The storyteller in transformers and as MiniGPT, its draft in both, a left-padded batch of two prompts."""
    hf, tokenizer = load_model("storyteller", device="cpu")
    draft, _ = load_model("draft", device="cpu")
    enc = tokenizer(["Once upon a time, a little fox", "The dog"], return_tensors="pt", padding=True)
    assert enc.attention_mask[1, 0] == 0  # the second prompt is padded
    return hf, MiniGPT.from_hf(hf), draft, MiniGPT.from_hf(draft), enc.input_ids, enc.attention_mask


def test_three_greedy_stacks_give_the_same_tokens(stories):
    hf, mini, draft, mini_draft, ids, mask = stories
    n, T = 40, ids.shape[1]
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)  # EOS and pad as configured
    assert torch.equal(greedy_search(hf, ids, mask, max_new_tokens=n).sequences, expected)
    assert torch.equal(greedy_search(mini, ids, mask, max_new_tokens=n).sequences, expected)
    no_eos = greedy_no_sync(mini, ids, mask, max_new_tokens=expected.shape[1] - T).sequences
    for row in range(2):  # the no-sync loop never stops: equal up to each row's EOS
        done = expected[row, T:] == hf.generation_config.eos_token_id
        upto = T + (int(done.nonzero()[0]) + 1 if done.any() else n)
        assert torch.equal(no_eos[row, :upto], expected[row, :upto])
    for row in range(2):  # speculative decoding, one row at a time, with its padding and mask
        for target, guesser in ((hf, draft), (mini, mini_draft)):
            out = speculative_generate(target, ids[row : row + 1], mask[row : row + 1], draft=guesser, k=4,
                                       max_new_tokens=n).sequences
            assert torch.equal(out, expected[row : row + 1, : out.shape[1]])
            assert out.shape[1] == T + n or out[0, -1] == hf.generation_config.eos_token_id
    unpadded = ids[1:, int((mask[1] == 0).sum()) :]  # the padded prompt without its padding
    alone = greedy_search(mini, unpadded, max_new_tokens=n).sequences
    assert torch.equal(alone[0, unpadded.shape[1] :], expected[1, T : T + alone.shape[1] - unpadded.shape[1]])
