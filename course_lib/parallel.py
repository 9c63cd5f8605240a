"""Serving many prompts: batching with left padding, prefix caching, data parallel ranks, multi-GPU placement.

Batching is the cheapest speed-up there is: a decode step reads every weight once whether it serves 1 row or
16, so rows 2..16 ride almost for free until compute, not memory, becomes the limit. Left padding keeps the
last real token of every row in the same column, and the attention mask keeps padding invisible, so each row
gets exactly the tokens it would get alone.

Several processes (ranks) each take a share of the prompts: ``torchrun`` starts them, ``torch.distributed``
(gloo on CPU, nccl on GPU) gathers the results::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m course_lib.parallel --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import torch

from course_lib.devices import to_model_device
from course_lib.kv_cache import DynamicKVCache
from course_lib.minigpt import MiniGPT, generate, new_cache, prefill
from course_lib.timing import BenchResult, benchmark


def encode_batch(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) left-padded to the longest prompt, and the attention mask (B, T): 1 real, 0 padding."""
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    if any(not isinstance(p, str) or not p for p in prompts):
        raise ValueError("every prompt must be a non-empty string")
    enc = tokenizer(list(prompts), padding=True, padding_side="left", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def generate_batch(model: MiniGPT, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   batch_size: int | None = None, cache: str = "dynamic") -> list[list[int]]:
    """Greedy continuations of ``prompts``, ``batch_size`` at a time (default: all at once).

    Returns the ``max_new_tokens`` new token ids of each prompt, in order (cut them at EOS with ``completions``).
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    encode_batch(tokenizer, prompts)  # validates before any work
    batch_size = batch_size or len(prompts)
    new_tokens = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = encode_batch(tokenizer, prompts[start : start + batch_size])
        out = generate(model, ids, max_new_tokens, cache=cache, attention_mask=mask)  # moves them to the model
        new_tokens += out[:, ids.shape[1] :].tolist()  # one host sync per batch, after the loop
    return new_tokens


def completions(tokenizer, new_tokens: Sequence[Sequence[int]], eos_token_id: int | None = None) -> list[str]:
    """Decode each row of new token ids, cut at its first EOS (the loop itself never checks for EOS)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    return [tokenizer.decode(row[: row.index(eos)] if eos in row else row) for row in new_tokens]


def throughput_by_batch(model: MiniGPT, ids: torch.Tensor, batch_sizes: Sequence[int], max_new_tokens: int,
                        repeats: int = 3) -> list[BenchResult]:
    """Time generation for each batch size on the first b rows of ``ids`` (N, T), equal-length prompts.

    Each result counts b x max_new_tokens new tokens (``tokens_per_s`` is the server's throughput); its
    ``median_s`` is also the latency of every request in the batch (all wait for the slowest step).
    """
    if max(batch_sizes) > ids.shape[0]:
        raise ValueError(f"largest batch size {max(batch_sizes)} needs that many prompt rows; ids has {ids.shape[0]}")
    ids = to_model_device(model, ids)  # once, outside the timed calls
    return [benchmark(lambda b=b: generate(model, ids[:b], max_new_tokens), name=f"batch {b}", repeats=repeats,
                      new_tokens=b * max_new_tokens, device=ids.device) for b in batch_sizes]


# ----------------------------------------------------------------------------- prefix caching


def build_prefix_cache(model: MiniGPT, prefix_ids: torch.Tensor) -> DynamicKVCache:
    """Run a shared prefix (1, P) once; its cache then serves any number of continuations."""
    cache = new_cache(model, "dynamic")
    prefill(model, prefix_ids, cache)
    return cache


def first_token_with_prefix_cache(model: MiniGPT, prefix_cache: DynamicKVCache,
                                  suffix_ids: torch.Tensor) -> torch.Tensor:
    """The first new token (1,) after prefix + suffix, running only the suffix on a copy of the prefix cache."""
    return prefill(model, suffix_ids, prefix_cache.clone()).argmax(-1)


def first_token_without_prefix_cache(model: MiniGPT, prefix_ids: torch.Tensor,
                                     suffix_ids: torch.Tensor) -> torch.Tensor:
    """The same first token, running prefix + suffix from scratch: what every request pays without reuse."""
    ids = torch.cat(to_model_device(model, prefix_ids, suffix_ids), dim=1)  # (1, P + S)
    return prefill(model, ids, new_cache(model, "dynamic")).argmax(-1)


def generate_from_prefix(model: MiniGPT, prefix_cache: DynamicKVCache, suffix_ids: torch.Tensor,
                         max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation of prefix + suffix that reuses the prefix cache (left untouched); (1, S + n)."""
    if prefix_cache.length == 0:
        raise ValueError("the prefix cache is empty: build it with build_prefix_cache(model, prefix_ids)")
    return generate(model, suffix_ids, max_new_tokens, cache=prefix_cache.clone())


# ----------------------------------------------------------------------------- data parallel ranks


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items rank ``rank`` of ``world_size`` handles: every world_size-th one (balanced, order-preserving)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(items[rank::world_size])


def unshard(parts: Sequence[Sequence]) -> list:
    """Undo ``shard``: interleave the per-rank lists back into the original order."""
    merged = []
    for i in range(max(len(p) for p in parts)):
        merged += [p[i] for p in parts if i < len(p)]
    return merged


def default_prompts(n: int = 8, words: int = 6) -> list[str]:
    """``n`` distinct openings (first ``words`` words) of held-out stories."""
    from course_lib.models import heldout_stories

    openings = dict.fromkeys(" ".join(story.split()[:words]) for story in heldout_stories())  # ordered, unique
    return list(openings)[:n]


def run_rank(model_name: str, prompts: list[str], max_new_tokens: int) -> list[dict] | None:
    """Body of one torchrun rank: generate this rank's share, gather everything on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    from course_lib.models import load_tokenizer

    # One GPU per rank, or all ranks on the CPU (2 ranks sharing 1 GPU would need a different placement).
    use_cuda = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")  # reads RANK/WORLD_SIZE set by torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # nccl collectives run on the current device
    model, tokenizer = MiniGPT.from_pretrained(model_name).to(device), load_tokenizer(model_name)
    mine = shard(prompts, rank, world)
    start = time.perf_counter()
    tokens = generate_batch(model, tokenizer, mine, max_new_tokens) if mine else []
    texts = completions(tokenizer, tokens)
    print(f"rank {rank}/{world} on {device}: {len(mine)} prompts in {time.perf_counter() - start:.2f} s", flush=True)
    parts = [None] * world
    dist.all_gather_object(parts, [dict(prompt=p, completion=c, new_tokens=t) for p, c, t in zip(mine, texts, tokens)])
    dist.destroy_process_group()
    return unshard(parts) if rank == 0 else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Data-parallel greedy generation; launch with torchrun.")
    parser.add_argument("--model", default="storyteller", help="bundled GPT-2 model name or model folder")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat the flag); default: held-out openings")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", help="write the gathered results to this JSON file (rank 0)")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        sys.exit("course_lib.parallel runs under torchrun, e.g.\n  python -m torch.distributed.run --standalone "
                 "--nproc_per_node 2 -m course_lib.parallel --max-new-tokens 24")
    results = run_rank(args.model, args.prompt or default_prompts(), args.max_new_tokens)
    if results is None:
        return
    for r in results:
        print(f"{r['prompt']!r} -> {r['completion']!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(world_size=int(os.environ["WORLD_SIZE"]), results=results), f, indent=1)


# ----------------------------------------------------------------------------- several GPUs, one model


class NotEnoughGPUsError(RuntimeError):
    """Spreading one model over several GPUs was asked for on a machine with fewer GPUs."""


def load_across_gpus(name_or_path: str = "storyteller", min_gpus: int = 2):
    """Load a transformers model split layer by layer over all visible GPUs with accelerate's ``device_map="auto"``.

    This replaced ``model.parallelize()`` (removed from transformers). Each GPU holds some of the layers and
    the activations travel from one GPU to the next: it makes a model fit that one GPU cannot hold, it does
    not make one request faster. ``model.hf_device_map`` tells where each layer went.
    """
    found = torch.cuda.device_count()
    if found < min_gpus:
        raise NotEnoughGPUsError(
            f"device_map='auto' spreads a model over several GPUs, but this machine has {found} CUDA GPU(s) "
            f"(need {min_gpus}). On one device use course_lib.load_model(...); run this on a machine with "
            f">= {min_gpus} GPUs to see the layers placed on cuda:0, cuda:1, ...")
    from transformers import AutoModelForCausalLM

    from course_lib.models import BUNDLED_MODELS, bundled_path

    source = bundled_path(name_or_path) if name_or_path in BUNDLED_MODELS else name_or_path
    return AutoModelForCausalLM.from_pretrained(source, device_map="auto", use_safetensors=True,
                                                trust_remote_code=False).eval()


if __name__ == "__main__":
    main()
