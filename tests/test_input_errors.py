"""Bad input gets a clear error that names the parameter (or the limit) and what is allowed, raised before
anything reaches torch: prompts longer than the context, ids outside the vocabulary, broken scores, a padded
batch without its mask, model folders that would load garbage, the README's train command, bad settings."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from course_lib import cli, train
from course_lib.checks import check_arg, is_integer, is_number
from course_lib.decoding import (
    FrequencyPresencePenalty, MinP, NoRepeatNGram, RepetitionPenalty, StopStrings, Temperature, TimeLimit, TopK,
    TopP, TypicalP, beam_search, contrastive_search, diverse_beam_search, generate, greedy_search,
    greedy_no_sync, next_token_probs, sample,
)
from course_lib.minigpt import MiniGPT
from course_lib.models import (ASSETS_DIR, ContextLengthError, NotAModelError, WeightsMismatchError, context_window,
                               load_model, load_tokenizer)
from course_lib.decoding.speculative import expected_speedup, speculative_generate
from course_lib.timing import benchmark, compare
from tiny_models import make_tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"
CONTEXT = 128  # the tiny models' context window
VOCAB = 97  # the tiny models' vocabulary

# Every decoder as f(model, input_ids, attention_mask, max_new_tokens); speculative decoding drafts with the
# target itself (one sequence at a time).
DECODERS = {
    "generate": lambda m, ids, mask, n: generate(m, ids, mask, max_new_tokens=n),
    "greedy_search": lambda m, ids, mask, n: greedy_search(m, ids, mask, max_new_tokens=n),
    "sample": lambda m, ids, mask, n: sample(m, ids, mask, max_new_tokens=n, seed=0),
    "beam_search": lambda m, ids, mask, n: beam_search(m, ids, mask, num_beams=2, max_new_tokens=n),
    "diverse_beam_search": lambda m, ids, mask, n: diverse_beam_search(
        m, ids, mask, num_beams=2, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=n),
    "contrastive_search": lambda m, ids, mask, n: contrastive_search(m, ids, mask, max_new_tokens=n),
    "speculative_generate": lambda m, ids, mask, n: speculative_generate(m, ids, mask, draft=m, max_new_tokens=n),
}
BATCH_DECODERS = [name for name in DECODERS if name != "speculative_generate"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def mini(tiny_gpt2):
    return MiniGPT.from_hf(tiny_gpt2)


def prompt(length: int, batch: int = 1) -> torch.Tensor:
    """Random ids in 1..VOCAB-1 (never the pad id 0)."""
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


# ----------------------------------------------------------------------------- 1. the context window


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_refuses_a_prompt_plus_new_tokens_past_the_context(tiny_model, decoder):
    """GPT-2 used to fail deep in torch ("index out of range in self"), Llama to run on silently."""
    with pytest.raises(ContextLengthError, match=rf"prompt \(120 tokens\) \+ max_new_tokens needs 129 tokens but "
                                                 rf"\w+ has a context window of {CONTEXT}"):
        DECODERS[decoder](tiny_model, prompt(120), None, 9)


@pytest.mark.parametrize("decoder", ["greedy_search", "beam_search", "speculative_generate"])
def test_a_prompt_that_exactly_fills_the_context_runs(tiny_model, decoder):
    out = DECODERS[decoder](tiny_model, prompt(120), None, 8)
    sequences = out.sequences
    assert sequences.shape[1] <= CONTEXT and torch.equal(sequences[:, :120], prompt(120))


def test_the_no_sync_loop_refuses_past_the_context(mini):
    with pytest.raises(ContextLengthError, match=rf"prompt \(120 tokens\) \+ max_new_tokens needs 129 "
                                                 rf"tokens but MiniGPT has a context window of {CONTEXT}"):
        greedy_no_sync(mini, prompt(120), max_new_tokens=9)
    assert greedy_no_sync(mini, prompt(120), max_new_tokens=8).sequences.shape == (1, CONTEXT)


def test_speculative_checks_the_drafts_context_too(tiny_gpt2):
    torch.manual_seed(0)
    short_draft = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB)).eval()
    with pytest.raises(ContextLengthError, match="context window of 64"):
        speculative_generate(tiny_gpt2, prompt(60), draft=short_draft, max_new_tokens=5)


def test_context_window_reads_each_architectures_config(storyteller, llama_model):
    assert context_window(storyteller[0]) == storyteller[0].config.n_positions == 256
    assert context_window(llama_model[0]) == llama_model[0].config.max_position_embeddings == 256
    with pytest.raises(ContextLengthError, match="context window of 256"):  # RoPE would not have failed here
        greedy_search(llama_model[0], prompt(250), max_new_tokens=10)


# ----------------------------------------------------------------------------- 2. token ids and scores


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[5, -1]]), rf"token id -1, outside the vocabulary of \w+: ids must be in 0\.\.{VOCAB - 1}"),
    (torch.tensor([[5, VOCAB]]), rf"token id {VOCAB}, outside the vocabulary of \w+: ids must be in 0\.\.{VOCAB - 1}"),
    (torch.tensor([[5.0, 6.0]]), r"input_ids must hold integer token ids \(torch.long\), got dtype torch.float32"),
    (torch.tensor([5, 6]), r"input_ids must be \(batch, length\) with batch >= 1 and length >= 1, got shape \(2,\)"),
])
def test_every_decoder_refuses_ids_the_embedding_cannot_look_up(tiny_gpt2, decoder, ids, message):
    with pytest.raises(ValueError, match=message):
        DECODERS[decoder](tiny_gpt2, ids, None, 2)


@pytest.mark.parametrize("ids", [torch.tensor([[5, VOCAB]]), torch.tensor([[5.0, 6.0]])])
def test_minigpt_and_next_token_probs_refuse_bad_ids(mini, tiny_gpt2, ids):
    with pytest.raises(ValueError, match="input_ids"):
        greedy_no_sync(mini, ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        next_token_probs(tiny_gpt2, ids)


PROCESSORS = [Temperature(0.7), TopK(5), TopP(0.9), MinP(0.1), TypicalP(0.9), RepetitionPenalty(1.2),
              FrequencyPresencePenalty(0.5, 0.5), NoRepeatNGram(2)]


@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: type(p).__name__)
def test_processors_refuse_scores_without_a_batch_dimension(processor):
    with pytest.raises(ValueError, match=r"scores must be a \(batch, vocab\) tensor, got \(10,\); .*scores\[None\]"):
        processor(torch.tensor([[1, 2, 3]]), torch.randn(10))


@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: type(p).__name__)
def test_processors_refuse_nan_scores(processor):
    scores = torch.randn(2, 10)
    scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="scores hold NaN"):
        processor(torch.tensor([[1, 2, 3], [4, 5, 6]]), scores)
    scores[1, 3] = -float("inf")  # a filtered token is fine
    assert processor(torch.tensor([[1, 2, 3], [4, 5, 6]]), scores).shape == (2, 10)


# ----------------------------------------------------------------------------- 3. padding without a mask


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 is two tokens shorter and padded on the left with the pad id 0."""
    ids = prompt(6, batch=2)
    ids[0, :2] = 0
    return ids, (ids != 0).long()


@pytest.mark.parametrize("decoder", BATCH_DECODERS)
def test_a_left_padded_batch_without_its_mask_is_refused(tiny_gpt2, decoder):
    ids, mask = left_padded()
    with pytest.raises(ValueError, match=r"row 0 starts with the pad id 0 and other rows do not.*Pass the "
                                         r"tokenizer's attention_mask"):
        DECODERS[decoder](tiny_gpt2, ids, None, 2)


def test_with_its_mask_a_padded_row_continues_like_the_prompt_alone(storyteller):
    """Why the refusal: the mask is what makes padding invisible. Masking nothing (the escape hatch for rows
    that really start with token 0) reads the pads as text and changes the next-token distribution."""
    model, tokenizer = storyteller
    batch = tokenizer(["The dog", "Once upon a time, there was"], padding=True, return_tensors="pt")
    alone = next_token_probs(model, tokenizer("The dog", return_tensors="pt").input_ids)[0]  # (vocab,)
    assert torch.allclose(next_token_probs(model, batch.input_ids, attention_mask=batch.attention_mask)[0], alone,
                          atol=1e-5)
    unmasked = next_token_probs(model, batch.input_ids, attention_mask=torch.ones_like(batch.input_ids))[0]
    assert (unmasked - alone).abs().max() > 0.01


def test_next_token_probs_refuses_a_left_padded_batch_without_its_mask(tiny_gpt2):
    ids, mask = left_padded()
    with pytest.raises(ValueError, match="attention_mask"):
        next_token_probs(tiny_gpt2, ids)
    assert next_token_probs(tiny_gpt2, ids, attention_mask=mask).shape == (2, VOCAB)


def test_rows_that_all_start_with_bos_are_let_through(tiny_gpt2):
    """pad = EOS = BOS = 0 for the course's models: BOS-prefixed prompts (data.encode_prompt) all start with
    id 0, so every row starting with it cannot be told from padding, and a single row proves nothing."""
    ids = prompt(5, batch=2)
    ids[:, 0] = 0
    assert greedy_search(tiny_gpt2, ids, max_new_tokens=2, eos_token_id=[]).sequences.shape == (2, 7)
    assert greedy_search(tiny_gpt2, ids[:1], max_new_tokens=2, eos_token_id=[]).sequences.shape == (1, 7)


# ----------------------------------------------------------------------------- 4. model folders


def test_a_folder_with_weights_but_no_tokenizer_is_refused(tmp_path, tiny_gpt2):
    tiny_gpt2.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(NotAModelError, match=r"has no tokenizer: expected one of tokenizer.json.*save_pretrained"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(NotAModelError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))


def save_mismatched(folder: Path, weights_of, config: dict) -> None:
    weights_of.save_pretrained(folder, safe_serialization=True)
    (folder / "config.json").write_text(json.dumps(config))
    load_tokenizer("storyteller").save_pretrained(folder)


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_gpt2, tiny_llama):
    save_mismatched(tmp_path, tiny_llama, tiny_gpt2.config.to_dict())
    with pytest.raises(WeightsMismatchError, match=r"do not fit the architecture its config.json describes: \d+ "
                                                   r"missing \(e.g. .*transformer.*\d+ unexpected \(e.g. model\."):
        load_model(str(tmp_path), device="cpu")


def test_weights_of_another_size_are_refused(tmp_path, tiny_gpt2):
    save_mismatched(tmp_path, tiny_gpt2, {**tiny_gpt2.config.to_dict(), "vocab_size": VOCAB + 3})
    with pytest.raises(WeightsMismatchError, match=r"\d+ of the wrong shape \(e.g. [^)]*transformer.wte.weight"):
        load_model(str(tmp_path), device="cpu")


# ----------------------------------------------------------------------------- 5. the README's train command


@pytest.fixture
def recorded_runs(monkeypatch, tmp_path) -> list[tuple]:
    """Run ``course`` in a folder holding the README's corpus file, with training replaced by a recorder."""
    monkeypatch.chdir(tmp_path)
    Path("tinystories-4mb.txt").write_text("Once upon a time.\n<|endoftext|>\n")
    runs = []
    monkeypatch.setattr(train, "train_preset", lambda *args: runs.append(args) or {"tokenizer": "written"})
    return runs


def test_the_readmes_train_commands_work_as_written(recorded_runs):
    commands = re.findall(r"`(course train [^`]*)`", README.read_text())
    assert commands == ["course train --corpus tinystories-4mb.txt --preset NAME"]
    for preset in ["tokenizer", *train.PRESETS]:
        argv = commands[0].replace("NAME", preset).split()[1:]
        assert cli.main(argv) == 0
        assert recorded_runs[-1] == (Path("tinystories-4mb.txt"), preset, ASSETS_DIR, None, None)


def test_train_options_and_help_reach_the_trainer(recorded_runs, capsys):
    cli.main(["train", "--corpus", "tinystories-4mb.txt", "--preset", "draft", "--steps", "3", "--out", "out"])
    assert recorded_runs == [(Path("tinystories-4mb.txt"), "draft", Path("out"), 3, None)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "-h"])
    assert exit_info.value.code == 0 and "usage: course train" in capsys.readouterr().out


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["doctor", "--corpus", "x"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --corpus x" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. bad settings name themselves


def tiny():
    return make_tiny_model("gpt2")


BAD_SETTINGS = [
    (lambda tok: TimeLimit("1"), "seconds='1' is not allowed; seconds must be a number > 0"),
    (lambda tok: TimeLimit(float("nan")), "seconds=nan is not allowed"),
    (lambda tok: StopStrings(tok, None), "stop_strings=None is not allowed; stop_strings must be a string or a list"),
    (lambda tok: sample(tiny(), prompt(3), max_new_tokens=2, seed="abc"), "seed='abc' is not allowed; seed must be an integer"),
    (lambda tok: sample(tiny(), prompt(3), max_new_tokens=2, seed=-1), "seed=-1 is not allowed"),
    (lambda tok: sample(tiny(), prompt(3), max_new_tokens=2, temperature="hot"), "temperature='hot' is not allowed"),
    (lambda tok: sample(tiny(), prompt(3), max_new_tokens=2, top_k=2.5), "top_k=2.5 is not allowed"),
    (lambda tok: sample(tiny(), prompt(3), max_new_tokens=2, top_p=float("nan")), "top_p=nan is not allowed"),
    (lambda tok: sample(tiny(), prompt(3), max_new_tokens=2.0), r"max_new_tokens=2.0 is not allowed; .*integer >= 0"),
    (lambda tok: greedy_search(tiny(), prompt(3), max_new_tokens=2, eos_token_id="x"), "eos_token_id='x' is not allowed"),
    (lambda tok: greedy_search(tiny(), prompt(3), max_new_tokens=2, pad_token_id=1.5), "pad_token_id=1.5 is not allowed"),
    (lambda tok: beam_search(tiny(), prompt(3), num_beams=2, max_new_tokens=2, length_penalty=float("nan")),
     r"length_penalty=nan is not allowed; length_penalty must be a finite number"),
    (lambda tok: beam_search(tiny(), prompt(3), num_beams=True, max_new_tokens=2), "num_beams=True is not allowed"),
    (lambda tok: diverse_beam_search(tiny(), prompt(3), num_beams=2, num_beam_groups=2,
                                     diversity_penalty=float("nan"), max_new_tokens=2), "diversity_penalty=nan"),
    (lambda tok: contrastive_search(tiny(), prompt(3), max_new_tokens=2, penalty_alpha=float("nan")),
     "penalty_alpha=nan"),
    (lambda tok: speculative_generate(tiny(), prompt(3), draft=tiny(), max_new_tokens=2, seed="x"),
     "seed='x' is not allowed"),
    (lambda tok: speculative_generate(tiny(), prompt(3), draft=tiny(), max_new_tokens=2, k=2.0), "k=2.0 is not allowed"),
    (lambda tok: expected_speedup(0.5, 4, float("nan")), "c=nan is not allowed"),
    (lambda tok: benchmark(lambda: None, new_tokens=-5), "new_tokens=-5 is not allowed; new_tokens must be an integer >= 0"),
    (lambda tok: benchmark(lambda: None, repeats=2.5), "repeats=2.5 is not allowed; repeats must be an integer >= 1"),
    (lambda tok: benchmark(lambda: None, warmup=-1), "warmup=-1 is not allowed; warmup must be an integer >= 0"),
    (lambda tok: benchmark(lambda: None, bytes_moved=1.5), "bytes_moved=1.5 is not allowed"),
    (lambda tok: compare({"a": lambda: None}, new_tokens={"a": "many"}), "new_tokens='many' is not allowed"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("storyteller")


@pytest.mark.parametrize("make, message", BAD_SETTINGS, ids=[m.split(" is")[0] for _, m in BAD_SETTINGS])
def test_bad_settings_name_the_parameter(tokenizer, make, message):
    with pytest.raises(ValueError, match=message):
        make(tokenizer)


def test_the_shared_check_refuses_bools_nan_and_strings_as_numbers():
    assert is_number(2) and is_number(0.5) and not is_number(True) and not is_number(float("inf"))
    assert not is_number("1") and is_integer(3) and not is_integer(3.0) and not is_integer(False)
    check_arg("k", 3, True, "anything")  # ok: nothing raised
    with pytest.raises(ValueError, match=r"^k=3.0 is not allowed; k must be an integer >= 1$"):
        check_arg("k", 3.0, is_integer(3.0), "an integer >= 1")
