"""The trainer, end to end on a few hundred stories for a few steps."""
import json

import pytest
import torch

from course_lib import data, train
from course_lib.data import heldout_stories
from course_lib.metrics import heldout_loss
from course_lib.models import EOS_TOKEN, load_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 short stories (the shipped held-out ones, numbered so they differ) in the corpus format."""
    base = heldout_stories()
    stories = [f"Story {i}. {base[i % len(base)]}" for i in range(300)]
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("".join(f"{s}\n{EOS_TOKEN}\n" for s in stories))
    return path, stories


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    path, _ = corpus
    out = tmp_path_factory.mktemp("out")
    train.train_preset(path, "tokenizer", out)
    facts = train.train_preset(path, "draft", out, steps=12)
    return out, facts


def test_read_stories_splits_at_separator_lines(corpus):
    path, stories = corpus
    assert data.read_stories(path) == stories


def test_read_stories_rejects_a_corpus_without_stories(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(f"{EOS_TOKEN}\n\n{EOS_TOKEN}\n")
    with pytest.raises(ValueError, match="holds no stories"):
        data.read_stories(empty)


def test_split_holds_out_five_percent_deterministically(corpus):
    _, stories = corpus
    tr, val = data.split_stories(stories)
    assert len(val) == 15 and len(tr) == 285 and not set(tr) & set(val)
    assert data.split_stories(stories) == (tr, val)


def test_tokenizer_has_eos_zero_and_round_trips(trained, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained[0] / "tokenizer")
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == 0 == tok.eos_token_id
    text = corpus[1][3]
    assert tok.decode(tok(text)["input_ids"]) == text


def test_training_lowers_the_loss_and_writes_a_loadable_model(trained, corpus):
    out, facts = trained
    folder = out / "models" / "draft"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    card = json.loads((folder / "training.json").read_text())
    assert card["tokens_seen"] == 12 * 8 * 256  # steps x batch x context
    # A random 4096-way guess costs ln(4096) = 8.3 nats; even 12 steps must beat it clearly.
    assert facts["heldout_nats_per_token"] < 8.0
    assert 0 < facts["heldout_bits_per_byte"] < 3
    model, tokenizer = load_model(str(folder), device="cpu")
    assert sum(p.numel() for p in model.parameters()) == facts["parameters"]
    _, val = data.split_stories(data.read_stories(corpus[0]))  # the card's loss holds for the shipped weights
    val_ids = data.encode_stories(tokenizer, val)
    assert card["heldout_nats_per_token"] == pytest.approx(heldout_loss(model, val_ids, 256)[0], abs=1e-4)
    assert "held-out bits per byte" in (folder / "README.md").read_text()


def test_training_is_reproducible(corpus, trained, tmp_path):
    path, _ = corpus
    (tmp_path / "tokenizer").mkdir()
    for f in (trained[0] / "tokenizer").iterdir():
        (tmp_path / "tokenizer" / f.name).write_bytes(f.read_bytes())
    train.train_preset(path, "draft", tmp_path, steps=12)
    a, _ = load_model(str(trained[0] / "models" / "draft"), device="cpu")
    b, _ = load_model(str(tmp_path / "models" / "draft"), device="cpu")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_unknown_preset(corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'; allowed: 'tokenizer', 'storyteller'"):
        train.train_preset(corpus[0], "huge", tmp_path)


def test_lr_schedule_warms_up_then_decays():
    cfg = train.TrainConfig(name="x", steps=1000, warmup=100, lr=1.0)
    assert train.lr_at(0, cfg) == pytest.approx(0.01)
    assert train.lr_at(99, cfg) == pytest.approx(1.0)
    assert train.lr_at(999, cfg) == pytest.approx(0.1, abs=1e-4)
