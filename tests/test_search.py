"""Search decoding checked against transformers: greedy and beam search must give the SAME token ids as
``model.generate`` (and beam scores within float tolerance); contrastive and diverse beam search, which
transformers 5.x no longer ships, are checked on their defining properties."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from course_lib.decoding import (
    beam_search, contrastive_search, decode_step, diverse_beam_search, greedy_search, new_cache, prefill,
)
from course_lib.decoding.contrastive import contrastive_scores, degeneration_penalty
from course_lib.decoding.diverse import hamming_penalty

MODES = (True, False, "never")
NEW = 12  # new tokens per run: enough for EOS to matter, short enough to stay fast
PAD = 1  # not 0: transformers fills ended beams with EOS when the pad id is 0 (a truthiness quirk)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def padded_prompts(seed: int = 1, lengths=(4, 6, 7), vocab: int = 97):
    """A left-padded batch of prompts of different lengths (pad id 0, never a prompt token)."""
    torch.manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), T))
    mask = (torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def hf_beam(model, ids, mask, **kw):
    out = model.generate(ids, attention_mask=mask, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences, out.sequences_scores


def busy_eos(model, ids, mask) -> int:
    """An EOS id the model actually produces mid-search, chosen so the three early-stopping modes give
    different results: otherwise the modes would not be tested at all."""
    free = beam_search(model, ids, mask, num_beams=4, num_return_sequences=4, max_new_tokens=NEW, eos_token_id=[])
    for token, _ in collections.Counter(free.sequences[:, ids.shape[1]:].flatten().tolist()).most_common(10):
        outs = [beam_search(model, ids, mask, num_beams=4, num_return_sequences=4, max_new_tokens=NEW,
                            early_stopping=mode, eos_token_id=token, pad_token_id=PAD) for mode in MODES]
        if any(o.sequences.shape != outs[0].sequences.shape or not torch.equal(o.sequences, outs[0].sequences)
               for o in outs[1:]):
            return token
    raise AssertionError("no frequent token makes the early-stopping modes differ")


@pytest.fixture(scope="module")
def case(tiny_model):
    ids, mask = padded_prompts()
    return tiny_model, ids, mask, busy_eos(tiny_model, ids, mask)


# ---- the decode loop --------------------------------------------------------------------------------

def test_prefill_and_decode_steps_match_a_full_forward(tiny_model):
    ids, mask = padded_prompts()
    cache = new_cache(tiny_model)
    logits = [prefill(tiny_model, ids[:, :5], mask[:, :5], cache=cache)]
    for t in range(5, ids.shape[1]):
        logits.append(decode_step(tiny_model, ids[:, t:t + 1], mask[:, :t + 1], cache=cache))
    with torch.no_grad():  # the same positions, no cache: every step's logits at once
        full = tiny_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.stack(logits, 1), full[:, 4:].float(), atol=1e-4, rtol=1e-4)


# ---- greedy and beam search == model.generate ----------------------------------------------------

def test_greedy_matches_generate_with_rows_ending_at_different_steps(case):
    model, ids, mask, _ = case
    free = greedy_search(model, ids, mask, max_new_tokens=NEW, eos_token_id=[]).sequences
    eos = int(free[0, ids.shape[1] + 1])  # row 0 ends after two tokens
    for kw in ({}, {"eos_token_id": eos, "pad_token_id": PAD}):  # the model's own EOS (0), then a busy one
        ours = greedy_search(model, ids, mask, max_new_tokens=NEW, **kw).sequences
        assert torch.equal(ours, model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kw))
    assert ours[0, -1] == PAD and (ours[1:, -1] != PAD).any(), "rows should finish at different steps"


@pytest.mark.parametrize("num_beams", [2, 3, 4])
def test_beam_search_matches_generate(case, num_beams):
    model, ids, mask, eos = case
    for length_penalty in (-1.0, 0.0, 1.0, 2.0):
        for early_stopping in MODES:
            for num_return in (1, num_beams):
                kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                          num_return_sequences=num_return, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
                ours = beam_search(model, ids, mask, **kw)
                sequences, scores = hf_beam(model, ids, mask, **kw)
                assert torch.equal(ours.sequences, sequences), kw
                torch.testing.assert_close(ours.scores, scores, atol=1e-5, rtol=1e-5)


def test_unpadded_prompt_matches_generate(case):
    model, ids, _, eos = case
    prompt = ids[2:]  # the longest prompt: no padding, so no attention mask at all
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(greedy_search(model, prompt, **kw).sequences, model.generate(prompt, do_sample=False, **kw))
    for num_beams in (2, 4):
        for early_stopping in MODES:
            ours = beam_search(model, prompt, num_beams=num_beams, early_stopping=early_stopping, **kw)
            sequences, scores = hf_beam(model, prompt, None, num_beams=num_beams, early_stopping=early_stopping, **kw)
            assert torch.equal(ours.sequences, sequences)
            torch.testing.assert_close(ours.scores, scores, atol=1e-5, rtol=1e-5)


def test_processors_see_the_right_ids_in_greedy_and_beam(case):
    """A processor that reads the ids so far (repetition penalty) gives generate()'s result in both loops."""
    model, ids, mask, eos = case
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.5)])
    ours = greedy_search(model, ids, mask, processors=processors, **kw).sequences
    assert torch.equal(ours, model.generate(ids, attention_mask=mask, do_sample=False, repetition_penalty=1.5, **kw))
    ours = beam_search(model, ids, mask, num_beams=3, processors=processors, **kw)
    sequences, scores = hf_beam(model, ids, mask, num_beams=3, repetition_penalty=1.5, **kw)
    assert torch.equal(ours.sequences, sequences)
    torch.testing.assert_close(ours.scores, scores, atol=1e-5, rtol=1e-5)


STORY_PROMPTS = ["Once upon a time, there was a", "The little dog", "Lily and Tom went to the park. They played"]


def test_bundled_storyteller_matches_generate(storyteller):
    model, tokenizer = storyteller
    batch = tokenizer(STORY_PROMPTS, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    assert torch.equal(greedy_search(model, ids, mask, max_new_tokens=24).sequences,
                       model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False))
    for num_beams, length_penalty in ((2, 1.0), (4, 0.0), (4, 2.0)):
        for early_stopping in MODES:
            kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                      num_return_sequences=2, max_new_tokens=24)
            ours = beam_search(model, ids, mask, **kw)
            sequences, scores = hf_beam(model, ids, mask, **kw)
            assert torch.equal(ours.sequences, sequences), kw
            torch.testing.assert_close(ours.scores, scores, atol=1e-5, rtol=1e-5)


def test_width_one_beam_is_greedy(case):
    model, ids, mask, eos = case
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    width_one = beam_search(model, ids, mask, num_beams=1, **kw).sequences
    assert torch.equal(width_one, greedy_search(model, ids, mask, **kw).sequences)


# ---- the recorded search tree --------------------------------------------------------------------

def test_search_tree_records_kept_pruned_and_scores(tiny_gpt2):
    ids, _ = padded_prompts(lengths=(5,))
    out = beam_search(tiny_gpt2, ids, num_beams=3, max_new_tokens=5, eos_token_id=[], record_tree=True)
    assert len(out.tree) == 5
    for record in out.tree[:-1]:
        kept = record.kept_as[0] >= 0
        assert kept.sum() == 3 and sorted(record.kept_as[0][kept].tolist()) == [0, 1, 2]
        assert record.scores[0][kept].min() >= record.scores[0][~kept].max()  # the best K survive
    # The winner ran to the length limit: its cumulative log-prob is in the last column, and its score is
    # that sum divided by its length (length_penalty=1).
    last = out.tree[-1].scores[0]
    assert torch.isclose(last, out.scores[0] * 5, atol=1e-5).any()


def test_beam_tree_plot_draws_every_candidate(tiny_gpt2):
    from course_lib.models import load_tokenizer
    from course_lib.plots import beam_tree

    ids, _ = padded_prompts(lengths=(5,))
    out = beam_search(tiny_gpt2, ids, num_beams=2, max_new_tokens=3, eos_token_id=[], record_tree=True)
    ax = beam_tree(out.tree, load_tokenizer(), best=out.sequences[0, 5:])
    assert len(ax.texts) == 1 + 3 * 4  # the prompt + 2K candidates per step
    assert sum(line.get_linewidth() == 3 for line in ax.lines) == 3  # the winner's path, one edge per step


# ---- contrastive search (Su et al. 2022) ---------------------------------------------------------

def test_contrastive_with_alpha_zero_or_one_candidate_is_greedy(case):
    model, ids, mask, eos = case
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    greedy = greedy_search(model, ids, mask, **kw).sequences
    assert torch.equal(contrastive_search(model, ids, mask, penalty_alpha=0.0, top_k=5, **kw).sequences, greedy)
    assert torch.equal(contrastive_search(model, ids, mask, penalty_alpha=0.6, top_k=1, **kw).sequences, greedy)


def test_degeneration_penalty_changes_the_choice_as_the_formula_says():
    context = torch.tensor([[[1.0, 0.0], [0.0, 0.0001]]])  # (1, 2, 2): the context points along x
    candidates = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # a copy of the context, and something new
    mask = torch.tensor([[1, 0]])  # the second context token is padding: it must not count
    penalty = degeneration_penalty(context, candidates, mask)
    torch.testing.assert_close(penalty, torch.tensor([[1.0, 0.0]]))
    probs = torch.tensor([[0.6, 0.4]])
    assert contrastive_scores(probs, penalty, 0.0).argmax() == 0  # alpha 0: the likelier token
    torch.testing.assert_close(contrastive_scores(probs, penalty, 0.5), torch.tensor([[-0.2, 0.2]]))
    assert contrastive_scores(probs, penalty, 0.5).argmax() == 1  # the repetition loses


def _brute_force_contrastive_token(model, ids, alpha: float, k: int) -> tuple[int, int]:
    """(contrastive choice, greedy choice) for the next token, from full forwards without any cache."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        probs, cands = out.logits[0, -1].softmax(-1).topk(k)
        penalties = []
        for token in cands:
            hidden = model(torch.cat([ids, token.view(1, 1)], 1), output_hidden_states=True).hidden_states[-1]
            penalties.append(torch.cosine_similarity(hidden[0, -1:], out.hidden_states[-1][0], dim=-1).max())
    return int(cands[((1 - alpha) * probs - alpha * torch.stack(penalties)).argmax()]), int(cands[0])


def test_contrastive_step_matches_a_brute_force_computation(tiny_gpt2):
    overruled = 0
    for seed in range(8):
        ids, _ = padded_prompts(lengths=(6,), seed=seed)
        expected, likeliest = _brute_force_contrastive_token(tiny_gpt2, ids, alpha=0.6, k=4)
        ours = contrastive_search(tiny_gpt2, ids, penalty_alpha=0.6, top_k=4, max_new_tokens=1, eos_token_id=[]).sequences
        assert ours[0, -1] == expected
        overruled += expected != likeliest
    assert overruled > 0, "some prompt should be one where the penalty overrules the likeliest token"


def test_contrastive_ignores_left_padding(case):
    model, ids, mask, _ = case
    batched = contrastive_search(model, ids, mask, max_new_tokens=NEW, eos_token_id=[]).sequences
    for row in range(ids.shape[0]):
        alone = ids[row:row + 1, mask[row].argmax():]
        single = contrastive_search(model, alone, max_new_tokens=NEW, eos_token_id=[]).sequences
        assert torch.equal(batched[row, -NEW:], single[0, -NEW:])


# ---- diverse beam search (Vijayakumar et al. 2016) -----------------------------------------------

def test_hamming_penalty_counts_earlier_picks():
    penalty = hamming_penalty(torch.tensor([[3, 3, 5]]), vocab_size=6, diversity_penalty=0.5)
    torch.testing.assert_close(penalty, torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.5]]))


def test_one_group_is_beam_search(case):
    model, ids, mask, eos = case
    for early_stopping in MODES:
        kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=NEW, early_stopping=early_stopping,
                  eos_token_id=eos, pad_token_id=PAD)
        plain = beam_search(model, ids, mask, **kw)
        diverse = diverse_beam_search(model, ids, mask, num_beam_groups=1, diversity_penalty=5.0, **kw)
        assert torch.equal(plain.sequences, diverse.sequences)
        torch.testing.assert_close(plain.scores, diverse.scores)


def _hypotheses(out, row: int, per_prompt: int) -> set:
    """Prompt ``row``'s returned hypotheses as (new ids without trailing pad, rounded score) pairs."""
    found = set()
    for ids, score in zip(out.sequences[row * per_prompt:(row + 1) * per_prompt], out.scores[row * per_prompt:]):
        ids = ids.tolist()
        while ids[-1] == PAD:
            ids.pop()
        found.add((tuple(ids), round(float(score), 4)))
    return found


def test_group_zero_is_plain_beam_search_and_later_groups_avoid_its_tokens(case):
    model, ids, mask, eos = case
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, pad_token_id=PAD)
    T = ids.shape[1]
    diverse = diverse_beam_search(model, ids, mask, num_beams=4, num_beam_groups=2, diversity_penalty=10.0,
                                  num_return_sequences=4, **kw)
    plain = beam_search(model, ids, mask, num_beams=2, num_return_sequences=2, **kw)
    wide = beam_search(model, ids, mask, num_beams=4, num_return_sequences=4, **kw)
    shared_in_wide = 0
    for b in range(ids.shape[0]):
        found, group0 = _hypotheses(diverse, b, 4), _hypotheses(plain, b, 2)
        assert group0 <= found  # group 0 pays no penalty: it IS beam search with 2 beams
        group1 = found - group0
        # Group 1 paid 10 nats for every token group 0 kept at step 1, so its hypotheses start elsewhere.
        assert {h[0][T] for h in group1}.isdisjoint({h[0][T] for h in group0})
        shared_in_wide += len({int(t) for t in wide.sequences[4 * b:4 * b + 4, T]}) < 4
    assert shared_in_wide > 0, "plain beam search should return hypotheses sharing a first token"
    # Without the penalty both groups search alike and return the same hypotheses twice.
    twins = diverse_beam_search(model, ids, mask, num_beams=4, num_beam_groups=2, diversity_penalty=0.0,
                                num_return_sequences=4, **kw)
    assert torch.equal(twins.sequences[0::2], twins.sequences[1::2])


# ---- clear errors ---------------------------------------------------------------------------------

SEARCHES = {  # each search with settings that work, which one test at a time spoils
    "beam": (beam_search, dict(num_beams=2, max_new_tokens=3)),
    "diverse": (diverse_beam_search, dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=3)),
    "contrastive": (contrastive_search, dict(max_new_tokens=3)),
}


@pytest.mark.parametrize("search, bad, message", [
    ("beam", dict(num_beams=0), "num_beams"),
    ("beam", dict(num_beams=2.5), "num_beams"),
    ("beam", dict(num_return_sequences=3), "num_return_sequences"),
    ("beam", dict(num_return_sequences=0), "num_return_sequences"),
    ("beam", dict(max_new_tokens=-1), "max_new_tokens"),
    ("beam", dict(early_stopping="sometimes"), "early_stopping"),
    ("beam", dict(early_stopping=1), "early_stopping"),
    ("beam", dict(length_penalty="long"), "length_penalty"),
    ("diverse", dict(num_beam_groups=3), "num_beam_groups"),
    ("diverse", dict(num_beam_groups=0), "num_beam_groups"),
    ("diverse", dict(diversity_penalty=-1.0), "diversity_penalty"),
    ("contrastive", dict(penalty_alpha=1.5), "penalty_alpha"),
    ("contrastive", dict(top_k=0), "top_k"),
    ("contrastive", dict(max_new_tokens=-2), "max_new_tokens"),
])
def test_bad_settings_are_refused(tiny_gpt2, search, bad, message):
    function, good = SEARCHES[search]
    with pytest.raises(ValueError, match=message):
        function(tiny_gpt2, torch.tensor([[5, 6]]), **{**good, **bad})


def test_the_loop_rejects_bad_shapes(tiny_gpt2):
    with pytest.raises(ValueError, match="input_ids"):
        greedy_search(tiny_gpt2, torch.tensor([5, 6]), max_new_tokens=2).sequences
    with pytest.raises(ValueError, match="attention_mask"):
        greedy_search(tiny_gpt2, torch.tensor([[5, 6]]), torch.ones(1, 3), max_new_tokens=2).sequences
    with pytest.raises(ValueError, match="one token per row"):
        decode_step(tiny_gpt2, torch.tensor([[5, 6]]), cache=new_cache(tiny_gpt2))

