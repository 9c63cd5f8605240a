"""Batching, prefix caching and data-parallel ranks give the tokens that one-at-a-time generation gives."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import make_tiny_model
from course_lib.batching import completions, generate_batch
from course_lib.decoding import greedy_no_sync, new_cache
from course_lib.minigpt import MiniGPT
from course_lib.models import NotEnoughGPUsError, load_across_gpus, load_tokenizer
from course_lib.prefix_cache import (build_prefix_cache, first_token_with_prefix_cache,
                                     first_token_without_prefix_cache, generate_from_prefix)
from course_lib.torchrun import main, shard, unshard

PROMPTS = ["Once upon a time", "The dog ran to the big red ball and", "Tom was sad", "A little bird sang every day"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random GPT-2 with the course tokenizer's vocabulary, saved like a bundled model."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    make_tiny_model("gpt2", vocab_size=4096).save_pretrained(folder)
    load_tokenizer("storyteller").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    return MiniGPT.from_pretrained(tiny_folder), load_tokenizer(str(tiny_folder))


def test_batched_rows_equal_one_at_a_time(tiny):
    model, tokenizer = tiny
    batched = generate_batch(model, tokenizer, PROMPTS, 10)
    in_twos = generate_batch(model, tokenizer, PROMPTS, 10, batch_size=2)
    alone = [generate_batch(model, tokenizer, [p], 10)[0] for p in PROMPTS]
    assert batched == alone == in_twos
    assert all(len(row) == 10 for row in batched)


def test_storyteller_batched_rows_equal_one_at_a_time(storyteller):
    hf, tokenizer = storyteller
    model = MiniGPT.from_hf(hf)
    batched = generate_batch(model, tokenizer, PROMPTS[:3], 16, cache="static")
    assert batched == [generate_batch(model, tokenizer, [p], 16)[0] for p in PROMPTS[:3]]


def test_completions_cut_at_eos(tiny):
    _, tokenizer = tiny
    a, b = tokenizer.encode(" the dog"), tokenizer.encode(" ran")
    eos = tokenizer.eos_token_id
    assert completions(tokenizer, [a + [eos] + b, a + b]) == [" the dog", " the dog ran"]


def test_prefix_cache_reuse_gives_uncached_tokens(tiny):
    model, tokenizer = tiny
    prefix = tokenizer(["Once upon a time there was a girl named Lily."], return_tensors="pt").input_ids
    cache = build_prefix_cache(model, prefix)
    for text in [" She liked", " One day she went"]:
        suffix = tokenizer([text], return_tensors="pt").input_ids
        reused = generate_from_prefix(model, cache, suffix, 8).sequences
        full = greedy_no_sync(model, torch.cat([prefix, suffix], dim=1), max_new_tokens=8).sequences
        assert torch.equal(reused, full[:, prefix.shape[1] :])
        assert torch.equal(first_token_with_prefix_cache(model, cache, suffix),
                           first_token_without_prefix_cache(model, prefix, suffix))
        assert torch.equal(first_token_with_prefix_cache(model, cache, suffix), reused[:, suffix.shape[1]])
    assert cache.get_seq_length() == prefix.shape[1]  # the shared prefix cache is never written to


def test_prefix_cache_works_for_transformers_models_too(storyteller):
    hf, tokenizer = storyteller
    prefix = tokenizer(["Once upon a time there was a girl named Lily."], return_tensors="pt").input_ids
    suffix = tokenizer([" She liked"], return_tensors="pt").input_ids
    cache = build_prefix_cache(hf, prefix)
    reused = generate_from_prefix(hf, cache, suffix, 6).sequences
    full = hf.generate(torch.cat([prefix, suffix], dim=1), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(reused, full[:, prefix.shape[1] :])
    assert cache.get_seq_length() == prefix.shape[1]


def test_shard_and_unshard_round_trip():
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert unshard(parts) == items
    assert unshard([shard(items[:1], r, 2) for r in range(2)]) == items[:1]


def test_torchrun_two_processes_gather_single_process_results(tiny, tiny_folder, tmp_path):
    """Really launches 2 ranks on the CPU (gloo); rank 0 gathers the results in prompt order."""
    model, tokenizer = tiny
    out = tmp_path / "results.json"
    prompt_args = [arg for p in PROMPTS + ["The end"] for arg in ("--prompt", p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "course_lib.torchrun", "--model", str(tiny_folder), "--max-new-tokens", "6",
                          "--out", str(out), *prompt_args], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0/2" in run.stdout and "rank 1/2" in run.stdout
    gathered = json.loads(out.read_text())
    assert gathered["world_size"] == 2
    assert [r["prompt"] for r in gathered["results"]] == PROMPTS + ["The end"]
    single = generate_batch(model, tokenizer, PROMPTS + ["The end"], 6)
    assert [r["new_tokens"] for r in gathered["results"]] == single
    assert [r["completion"] for r in gathered["results"]] == completions(tokenizer, single)


def test_bad_input_is_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list"):
        generate_batch(model, tokenizer, [], 4)
    with pytest.raises(ValueError, match="prompts must be a string or a non-empty list"):
        generate_batch(model, tokenizer, ["ok", 3], 4)
    with pytest.raises(ValueError, match="batch_size"):
        generate_batch(model, tokenizer, PROMPTS, 4, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="empty"):
        generate_from_prefix(model, new_cache(model), torch.ones(1, 2, dtype=torch.long), 2)


def test_runner_outside_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="torchrun"):
        main(["--max-new-tokens", "2"])


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has several GPUs")
def test_multi_gpu_placement_explains_missing_gpus():
    with pytest.raises(NotEnoughGPUsError, match=f"has {torch.cuda.device_count()} CUDA GPU"):
        load_across_gpus("storyteller")
