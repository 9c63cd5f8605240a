"""Serving a stream of requests: one at a time, static batching, and continuous batching on a paged KV cache.

    requests = make_workload(tokenizer, n=64, seed=0)          # mixed prompt and output lengths
    result = serve(model, requests, max_batch=8, policy="continuous")
    result.tokens_per_s, result.mean_latency_s, result.p95_latency_s, result.occupancy

Every policy runs the same step (``ragged_forward``: one forward over the new tokens of every running sequence,
whole prompts of new ones and one token of the others, flattened into one ragged batch, as vLLM and
transformers' continuous batching do), so the policies differ only in *when* a request may start:

- "one-at-a-time": a request starts when the previous one has finished;
- "static": up to ``max_batch`` requests start together and end together, as a padded batch does in
  ``generate()``: a finished row keeps computing (padding) until the slowest request of its batch is done, then
  the whole batch returns and the next one starts;
- "continuous": iteration-level scheduling (Yu et al. 2022, "Orca", OSDI): after every step, waiting requests
  take the places of finished ones.

Keys and values live in a ``PagedKVCache``: a request takes blocks as it grows and frees them when it ends.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence, TypeVar

import torch
import torch.nn.functional as F

from course_lib.checks import check_arg, is_integer
from course_lib.data import encode_prompt, heldout_stories
from course_lib.fastpath import LeanWeights, after_attention, lean_weights, qkv
from course_lib.minigpt import MiniGPT
from course_lib.paged_kv import PagedKVCache

POLICIES = ("one-at-a-time", "static", "continuous")
T = TypeVar("T")


@dataclass(frozen=True)
class Request:
    """One generation request: greedy, exactly ``max_new_tokens`` new tokens (no EOS stop, as in benchmarks)."""

    id: int
    prompt: tuple[int, ...]  # token ids, BOS first
    max_new_tokens: int


def make_workload(tokenizer, n: int = 64, min_new: int = 8, max_new: int = 200, prompt_words: tuple[int, int] = (3, 30),
                  seed: int = 0) -> list[Request]:
    """``n`` requests: prompts are the first 3-30 words of held-out stories, outputs 8-200 tokens, seeded."""
    check_arg("n", n, is_integer(n) and n >= 1, "an integer >= 1")
    check_arg("min_new", min_new, is_integer(min_new) and 1 <= min_new <= max_new, "an integer in 1..max_new")
    rng = random.Random(seed)
    stories = heldout_stories()
    requests = []
    for i in range(n):
        words = rng.choice(stories).split()[: rng.randint(*prompt_words)]
        requests.append(Request(i, tuple(encode_prompt(tokenizer, " ".join(words))), rng.randint(min_new, max_new)))
    return requests


def pool_blocks(requests: list[Request], max_batch: int, block_size: int) -> int:
    """Blocks for ``max_batch`` rows of the longest prompt plus the most new tokens: as long as a row can grow
    (a padding row of a static batch grows until its slowest request is done)."""
    longest = max(len(r.prompt) for r in requests) + max(r.max_new_tokens for r in requests)
    return max_batch * -(-longest // block_size)


@dataclass
class RaggedBatch:
    """The new tokens of several sequences flattened into one batch of N tokens (S = the longest context)."""

    tokens: torch.LongTensor  # (N,)
    positions: torch.LongTensor  # (N,): each token's position in its sequence
    write: torch.LongTensor  # (N,): the physical cache slot each token's key/value goes to
    context: torch.LongTensor  # (N, S): the physical slots of each token's whole sequence (padding: slot 0)
    last: torch.LongTensor  # (sequences,): where each sequence's last new token sits among the N


def ragged_batch(cache: PagedKVCache, batch: list[tuple[int, list[int]]]) -> RaggedBatch:
    """Take cache slots for ``batch`` = [(sequence, its new tokens)]: a whole prompt for a sequence that starts,
    one token for a running one. Tensors on the cache's device."""
    device = cache.keys.device
    S = max(cache.lengths[seq] + len(new) for seq, new in batch)
    tokens, positions, write, context = [], [], [], []
    for seq, new in batch:
        start = cache.lengths[seq]
        write.append(cache.append(seq, len(new)))  # blocks are taken here, as the sequence grows
        tokens += new
        positions.append(torch.arange(start, start + len(new)))
        context.append(F.pad(cache.context_slots(seq), (0, S - start - len(new))).expand(len(new), S))
    last = torch.tensor([len(new) for _, new in batch]).cumsum(0) - 1
    return RaggedBatch(torch.tensor(tokens, device=device), torch.cat(positions).to(device), torch.cat(write),
                       torch.cat(context), last.to(device))


def ragged_forward(w: LeanWeights, cache: PagedKVCache, batch: RaggedBatch) -> torch.LongTensor:
    """One forward pass over a ragged batch, reading and writing keys/values through the block tables;
    returns each sequence's greedy next token (sequences,)."""
    N, C, nh = len(batch.tokens), w.wte.shape[1], w.n_head
    S = batch.context.shape[1]
    slots = torch.arange(S, device=batch.positions.device)
    visible = (slots <= batch.positions[:, None])[:, None, None]  # (N, 1, 1, S): causal, within each sequence
    x = w.wte[batch.tokens] + w.wpe[batch.positions]  # (N, C)
    for i, block in enumerate(w.blocks):
        q, k, v = qkv(w, block, x).view(N, 3, nh, C // nh).unbind(1)  # 3 x (N, nh, hd)
        cache.keys[i].index_copy_(0, batch.write, k)  # written before reading: a prompt's tokens see each other
        cache.values[i].index_copy_(0, batch.write, v)
        keys = cache.keys[i][batch.context].transpose(1, 2)  # (N, nh, S, hd): gathered through the block table
        values = cache.values[i][batch.context].transpose(1, 2)
        y = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=visible)  # (N, nh, 1, hd)
        x = after_attention(w, block, x, y.reshape(N, C))  # (N, C)
    x = F.layer_norm(x[batch.last], (C,), *w.ln_f, w.eps)  # (sequences, C): only the last tokens need logits
    return (x @ w.head).argmax(dim=-1)  # (sequences,)


@dataclass
class ServeResult:
    """What a run of ``serve`` measured."""

    policy: str
    max_batch: int
    outputs: dict[int, list[int]]  # request id -> its new tokens
    finish_s: dict[int, float]  # request id -> seconds from the start until its result comes back
    seconds: float
    occupancy: list[list[int | None]] = field(default_factory=list)  # per step: the request in each batch slot
    kv_bytes: list[int] = field(default_factory=list)  # per step: bytes of the paged blocks in use
    first_token_s: dict[int, float] = field(default_factory=dict)  # request id -> when its first token was made
    last_token_s: dict[int, float] = field(default_factory=dict)  # request id -> when its last token was made

    @property
    def new_tokens(self) -> int:
        return sum(len(out) for out in self.outputs.values())

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds

    @property
    def mean_latency_s(self) -> float:
        """Mean time from the start (every request arrives at 0) to a request's last token."""
        return sum(self.finish_s.values()) / len(self.finish_s)

    @property
    def p95_latency_s(self) -> float:
        times = sorted(self.finish_s.values())
        return times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]

    @property
    def mean_ttft_s(self) -> float:
        """Time to first token: mean seconds from the start (every request arrives at 0) to a request's first
        token, as a streaming server would send it."""
        if not self.first_token_s:
            raise ValueError(f"the {self.policy!r} run recorded no token times (only serve() records them)")
        return sum(self.first_token_s.values()) / len(self.first_token_s)

    @property
    def mean_tpot_s(self) -> float:
        """Time per output token after the first: mean over requests of (last - first token) / (tokens - 1)."""
        gaps = [(self.last_token_s[i] - self.first_token_s[i]) / (len(out) - 1)
                for i, out in self.outputs.items() if len(out) > 1 and i in self.first_token_s]
        if not gaps:
            raise ValueError(f"the {self.policy!r} run recorded no request with two or more timed tokens")
        return sum(gaps) / len(gaps)


def admit(places: list[object | None], waiting: Sequence[T], policy: str) -> list[tuple[int, T]]:
    """The scheduler's admission plan for one step: which waiting requests take which free places, as
    (place, request) pairs, first come first served, lowest free place first. Changes nothing itself.

    "continuous" fills every free place now; "static" and "one-at-a-time" admit only into an empty batch (a
    batch starts together). ``places`` holds the request running in each batch place, None where it is free.
    """
    check_arg("policy", policy, policy in POLICIES, f"one of {', '.join(map(repr, POLICIES))}")
    if policy != "continuous" and any(p is not None for p in places):
        return []
    free = [i for i, p in enumerate(places) if p is None]
    return list(zip(free, waiting))  # zip stops at the shorter: no more requests than free places


@torch.inference_mode()
def serve(model: MiniGPT | None, requests: list[Request], *, max_batch: int, policy: str = "continuous",
          block_size: int = 16, num_blocks: int | None = None) -> ServeResult:
    """Run every request greedily under ``policy`` with at most ``max_batch`` running at once.

    ``num_blocks`` (default: ``pool_blocks``) sizes the paged cache; a real server with fewer blocks would preempt a request, here a full pool raises
    ``CacheFullError``. ``occupancy`` shows a finished row of a static batch as idle (None): it computes padding.
    ``model=None`` runs the scheduler alone (no cache, every token 0): a policy's steps and occupancy, free.
    """
    check_arg("policy", policy, policy in POLICIES, f"one of {', '.join(map(repr, POLICIES))}")
    check_arg("max_batch", max_batch, is_integer(max_batch) and max_batch >= 1, "an integer >= 1")
    if policy == "one-at-a-time":
        max_batch = 1
    w, cache = None, None
    if model is not None:
        w = lean_weights(model)
        cache = PagedKVCache(len(w.blocks), w.n_head, w.wte.shape[1] // w.n_head,
                             num_blocks or pool_blocks(requests, max_batch, block_size), block_size, w.wte.dtype,
                             w.wte.device)
    waiting, slots = deque(requests), [None] * max_batch  # slots: the request running in each batch place
    result = ServeResult(policy, max_batch, {r.id: [] for r in requests}, {}, 0.0)
    done = lambda r: len(result.outputs[r.id]) == r.max_new_tokens  # noqa: E731
    start = time.perf_counter()
    while waiting or any(r is not None for r in slots):
        for place, r in admit(slots, waiting, policy):  # the plan, in first-come order
            slots[place] = waiting.popleft()
            if cache is not None:
                cache.add(r.id)
        running = [r for r in slots if r is not None]
        batch = [(r.id, list(r.prompt) if not result.outputs[r.id] else result.outputs[r.id][-1:]) for r in running]
        # the scheduler reads the tokens (a host sync per step), to feed each one back at the next step
        next_tokens = [0] * len(batch) if w is None else ragged_forward(w, cache, ragged_batch(cache, batch)).tolist()
        result.occupancy.append([None if r is None or done(r) else r.id for r in slots])  # who made a token
        now = time.perf_counter() - start
        for r, token in zip(running, next_tokens):
            if not done(r):  # a finished row of a static batch computed padding: its token is dropped
                result.outputs[r.id].append(token)
                result.first_token_s.setdefault(r.id, now)
                result.last_token_s[r.id] = now
        result.kv_bytes.append(0 if cache is None else cache.used_bytes)
        batch_over = policy != "static" or all(r is None or done(r) for r in slots)
        for place, r in enumerate(slots):
            if r is not None and done(r) and batch_over:
                result.finish_s[r.id] = now
                if cache is not None:
                    cache.free(r.id)
                slots[place] = None
    result.seconds = time.perf_counter() - start
    return result


def transformers_serve(model, requests: list[Request], *, max_batch: int, page_size: int = 16) -> ServeResult:
    """The same requests through transformers' own continuous batching (a paged cache, a scheduler and a
    background generation thread: ``model.continuous_batching_context_manager``), greedy, no EOS stop.

    Its pool is sized as ``serve`` sizes ours; left to size itself on a CPU it takes a share of the machine's
    memory, and every step then pays for attending over all of it.
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    check_arg("max_batch", max_batch, is_integer(max_batch) and max_batch >= 1, "an integer >= 1")
    settings = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in requests),
                                eos_token_id=-1, pad_token_id=model.generation_config.pad_token_id)  # -1: no EOS
    batching = ContinuousBatchingConfig(
        max_requests_per_batch=max_batch, page_size=page_size, allow_block_sharing=False,
        num_blocks=pool_blocks(requests, max_batch, page_size),
        max_batch_tokens=max(len(r.prompt) for r in requests) + max_batch)  # one new prompt + the running tokens
    result = ServeResult("transformers continuous", max_batch, {}, {}, 0.0)
    with model.continuous_batching_context_manager(generation_config=settings, continuous_batching_config=batching,
                                                   warmup=False) as manager:
        start = time.perf_counter()
        for r in requests:
            manager.add_request(list(r.prompt), request_id=str(r.id), max_new_tokens=r.max_new_tokens)
        while len(result.outputs) < len(requests):
            done = manager.get_result(timeout=60)
            if done is None:
                raise RuntimeError("transformers' continuous batching returned nothing for 60 s")
            if done.is_finished():
                result.outputs[int(done.request_id)] = list(done.generated_tokens)
                result.finish_s[int(done.request_id)] = time.perf_counter() - start
        result.seconds = time.perf_counter() - start
    return result
