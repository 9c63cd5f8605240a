"""Data-parallel generation: several processes (ranks) each take a share of the prompts.

``torchrun`` starts the processes and tells each its ``RANK`` and ``WORLD_SIZE``; ``torch.distributed`` (gloo
on CPU, nccl on GPU) gathers the results on rank 0::

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m course_lib.torchrun --max-new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import torch

from course_lib.batching import completions, generate_batch
from course_lib.data import heldout_stories
from course_lib.minigpt import MiniGPT
from course_lib.models import load_tokenizer


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
    openings = dict.fromkeys(" ".join(story.split()[:words]) for story in heldout_stories())  # ordered, unique
    return list(openings)[:n]


def run_rank(model_name: str, prompts: list[str], max_new_tokens: int) -> list[dict] | None:
    """Body of one torchrun rank: generate this rank's share, gather everything on rank 0 (None elsewhere)."""
    import torch.distributed as dist

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
        sys.exit("course_lib.torchrun runs under torchrun, e.g.\n  python -m torch.distributed.run --standalone "
                 "--nproc_per_node 2 -m course_lib.torchrun --max-new-tokens 24")
    results = run_rank(args.model, args.prompt or default_prompts(), args.max_new_tokens)
    if results is None:
        return
    for r in results:
        print(f"{r['prompt']!r} -> {r['completion']!r}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(world_size=int(os.environ["WORLD_SIZE"]), results=results), f, indent=1)


if __name__ == "__main__":
    main()
