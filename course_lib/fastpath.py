"""The fast path: greedy decoding of a ``MiniGPT`` with the per-token overhead taken out (gpt-fast's recipe).

    out = fast_greedy(model, input_ids, max_new_tokens=240)                          # lean eager steps
    out = fast_greedy(model, input_ids, max_new_tokens=240, compile=True, tokens_per_call=8)

At batch 1 a small model's decode step is mostly overhead: Python, ``nn.Module`` calls, one dispatch per
operation (notebook 12 profiles it). The arithmetic of one storyteller token is about 7 MFLOP, a fraction of a
millisecond. So this file removes overhead, one kind at a time:

- ``LeanWeights``: the model's weights as plain tensors in tuples, read once (no module calls, no attribute
  look-ups per token), each matrix stored (in, out) as GPT-2's own ``Conv1D`` stores it: on CPUs the one-row
  product ``x @ W`` streams that layout faster than ``nn.Linear``'s (out, in);
- the course's ``StaticKVCache`` written in place with ``index_copy_`` at a position held in a tensor, attention
  over all its slots with a mask ``slot <= position``: every step has the same shapes, so a compiled step never
  recompiles;
- ``lean_forward``: tokens through the model in a dozen operations per layer (one token per row when decoding);
- ``decode_tokens``: ``n`` greedy steps in one call, the argmax fed straight back in, so a compiled graph covers
  ``n`` tokens and pays the call overhead once;
- no host sync in the loop: tokens are written into a preallocated output and never read by Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from course_lib.checks import check_arg, is_integer
from course_lib.decoding.prepare import GenerateOutput, prepare
from course_lib.decoding.speculative import SpeculativeOutput, accept_greedy
from course_lib.decoding.steps import prefill
from course_lib.minigpt import ACTIVATIONS, MiniGPT
from course_lib.models import check_fits


class BlockWeights(NamedTuple):
    """One transformer block's weights as (weight, bias) pairs, named as in ``MiniGPT``; matrices are (in, out)."""

    ln_1: tuple[torch.Tensor, torch.Tensor]
    c_attn: tuple[torch.Tensor, torch.Tensor]  # queries, keys and values in one matrix: (C, 3C)
    c_proj: tuple[torch.Tensor, torch.Tensor]  # (C, C)
    ln_2: tuple[torch.Tensor, torch.Tensor]
    c_fc: tuple[torch.Tensor, torch.Tensor]  # (C, 4C)
    mlp_proj: tuple[torch.Tensor, torch.Tensor]  # (4C, C)


@dataclass(frozen=True)
class LeanWeights:
    """A ``MiniGPT``'s weights as plain tensors: norms and embeddings share the model's storage, matrices are
    (in, out) copies."""

    wte: torch.Tensor  # (vocab, C): token embeddings
    head: torch.Tensor  # (C, vocab): the output head, wte transposed
    wpe: torch.Tensor  # (positions, C)
    blocks: tuple[BlockWeights, ...]
    ln_f: tuple[torch.Tensor, torch.Tensor]
    n_head: int
    eps: float
    approximate: str  # F.gelu's approximate=


def lean_weights(model: MiniGPT) -> LeanWeights:
    """Read ``model``'s weights once into a ``LeanWeights``."""
    if not isinstance(model, MiniGPT):
        raise TypeError(f"model must be a course MiniGPT (MiniGPT.from_hf(hf_model) converts a transformers GPT-2), "
                        f"got {type(model).__name__}")
    pair = lambda m: (m.weight, m.bias)  # noqa: E731
    t_pair = lambda m: (m.weight.t().contiguous(), m.bias)  # noqa: E731  (out, in) -> (in, out)
    blocks = tuple(BlockWeights(pair(b.ln_1), t_pair(b.attn.c_attn), t_pair(b.attn.c_proj), pair(b.ln_2),
                                t_pair(b.mlp.c_fc), t_pair(b.mlp.c_proj)) for b in model.h)
    cfg = model.config
    return LeanWeights(model.wte.weight, model.wte.weight.t().contiguous(), model.wpe.weight, blocks,
                       pair(model.ln_f), cfg.n_head, cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation_function])


def linear(x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``x @ W + b`` for rows ``x`` (N, in) and an (in, out) matrix: (N, out), one ``addmm`` as in GPT-2's Conv1D."""
    w, b = weights
    return torch.addmm(b, x, w)


def qkv(w: LeanWeights, block: BlockWeights, x: torch.Tensor) -> torch.Tensor:
    """The block's first half up to attention: queries, keys and values of the rows ``x`` (N, C), as (N, 3C)."""
    return linear(F.layer_norm(x, x.shape[-1:], *block.ln_1, w.eps), block.c_attn)


def after_attention(w: LeanWeights, block: BlockWeights, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The block's second half: rows ``x`` (N, C) plus the projected attention output ``y`` (N, C), then the MLP."""
    x = x + linear(y, block.c_proj)
    h = F.layer_norm(x, x.shape[-1:], *block.ln_2, w.eps)
    return x + linear(F.gelu(linear(h, block.c_fc), approximate=w.approximate), block.mlp_proj)


def lean_forward(w: LeanWeights, keys: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
    """Feed ``tokens`` (B, T) at ``positions`` (T,), writing their keys/values into the static buffers
    ``keys``/``values`` (L, B, heads, S, hd) in place. Returns the logits (B, T, vocab).

    A token at position p sees the slots 0..p: the ones written before (the past) and its own. Slots after p
    may hold stale keys of rejected guesses (speculative decoding); the mask hides them, so nothing is cropped.
    """
    (B, T), C, nh = tokens.shape, w.wte.shape[1], w.n_head
    x = (w.wte[tokens] + w.wpe[positions]).view(B * T, C)  # (B*T, C): rows, so a matrix product is one addmm
    visible = torch.arange(keys.shape[3], device=positions.device) <= positions[:, None]  # (T, S)
    for i, block in enumerate(w.blocks):
        q, k, v = qkv(w, block, x).view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        keys[i].index_copy_(2, positions, k)  # the new tokens' keys, in their slots: no allocation, no copy
        values[i].index_copy_(2, positions, v)
        y = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=visible)  # (B, nh, T, hd)
        x = after_attention(w, block, x, y.transpose(1, 2).reshape(B * T, C))  # (B*T, C)
    return (F.layer_norm(x, (C,), *w.ln_f, w.eps) @ w.head).view(B, T, -1)  # (B, T, vocab)


def matmuls_only(w: LeanWeights) -> Callable[[], torch.Tensor]:
    """One token's matrix products and nothing else: every weight matrix of ``w`` read once, as a decode step
    reads them, without attention, norms, activations or Python between the layers. Time it for the floor
    under any decode step that reads these fp32 weights with these kernels."""
    C = w.wte.shape[1]
    x, h = w.wte.new_zeros(1, C), w.wte.new_zeros(1, 4 * C)  # (1, C), (1, 4C): the shapes of one token

    def step() -> torch.Tensor:
        for block in w.blocks:
            linear(x, block.c_attn), linear(x, block.c_proj)
            linear(x, block.c_fc), linear(h, block.mlp_proj)
        return x @ w.head  # (1, vocab): the LM head, the largest matrix
    return step


def decode_tokens(w: LeanWeights, keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor,
                  pos: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy steps from ``token`` (B,) at ``pos`` (1,): the next ``n`` tokens (B, n). A plain loop, so a
    compiled ``decode_tokens`` is one graph for ``n`` tokens."""
    out = []
    for _ in range(n):
        token = lean_forward(w, keys, values, token[:, None], pos)[:, -1].argmax(dim=-1)  # (B,)
        out.append(token)
        pos = pos + 1
    return torch.stack(out, dim=1) if out else token.new_empty(token.shape[0], 0)  # (B, n)


@functools.cache
def compiled_decode_tokens(mode: str | None = None):
    """``decode_tokens`` compiled with ``torch.compile`` (one graph; ``mode="reduce-overhead"`` adds CUDA graphs
    on a GPU). Compiling happens at the first call for each batch size, cache size and ``n``."""
    return torch.compile(decode_tokens, mode=mode, fullgraph=True, dynamic=False)


@torch.inference_mode()
def fast_greedy(model: MiniGPT, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                max_new_tokens: int, compile: bool = False, tokens_per_call: int = 1,
                mode: str | None = None) -> GenerateOutput:
    """Greedy generation of exactly ``max_new_tokens`` per row on the fast path: (B, T + new), no EOS check.

    The prompt goes through ``MiniGPT`` as usual (``prefill``, into a ``StaticKVCache``); then ``decode_tokens``
    makes ``tokens_per_call`` tokens per call, eagerly or compiled (``compile=True``, with ``mode``). The first
    compiled call compiles: time it apart. Rows may not be padded (the lean step has no padding mask).
    """
    check_arg("tokens_per_call", tokens_per_call, is_integer(tokens_per_call) and tokens_per_call >= 1,
              "an integer >= 1")
    w = lean_weights(model)
    run = prepare(model, input_ids, attention_mask, max_new_tokens)
    if run.attention_mask is not None:
        raise ValueError("fast_greedy takes unpadded prompts: attention_mask must be None or all ones "
                         "(use greedy_no_sync for left-padded batches)")
    ids = run.input_ids
    B, T = ids.shape
    if max_new_tokens == 0:
        return GenerateOutput(ids)
    calls = -(-(max_new_tokens - 1) // tokens_per_call)  # the first new token comes from the prefill
    slots = T + 1 + calls * tokens_per_call - 1  # the last call may run past max_new_tokens; those are cut
    check_fits(model, slots, what=f"{T} prompt tokens + max_new_tokens rounded up to whole calls of "
                                  f"tokens_per_call={tokens_per_call}")
    cache = model.make_cache("static", B, slots)
    step = compiled_decode_tokens(mode) if compile else decode_tokens
    out = torch.empty(B, T + 1 + calls * tokens_per_call, dtype=ids.dtype, device=ids.device)  # filled in place
    out[:, :T] = ids
    out[:, T] = prefill(model, ids, cache=cache).argmax(dim=-1)  # (B,)
    pos = torch.tensor([T], device=ids.device)  # where the next token's keys go
    for c in range(calls):
        start = T + c * tokens_per_call
        out[:, start + 1 : start + 1 + tokens_per_call] = step(w, cache.keys, cache.values, out[:, start],
                                                               pos + c * tokens_per_call, tokens_per_call)
    return GenerateOutput(out[:, : T + max_new_tokens])


@torch.inference_mode()
def fast_speculative(model: MiniGPT, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, *,
                     draft: MiniGPT, k: int = 4, max_new_tokens: int) -> SpeculativeOutput:
    """Greedy speculative decoding on the fast path: exactly the target's greedy tokens, one sequence (1, T + new).

    Each round the draft makes ``k`` guesses with lean steps, the target checks them all in one ``lean_forward``
    over k + 1 tokens, and the longest agreeing prefix plus the target's own next token are kept (gpt-fast's
    loop). Both caches are static: a rejected guess needs no crop, its slot is overwritten later and the mask
    hides it until then. One host sync per round, to count the accepted guesses.
    """
    check_arg("k", k, is_integer(k) and k >= 1, "an integer >= 1 (draft tokens per step)")
    run = prepare(model, input_ids, attention_mask, max_new_tokens)
    if run.attention_mask is not None or run.input_ids.shape[0] != 1:
        raise ValueError("fast_speculative decodes one unpadded sequence: input_ids must be (1, T) without padding")
    ids = run.input_ids
    T = ids.shape[1]
    check_fits(model, T + max_new_tokens + k, what=f"{T} prompt tokens + max_new_tokens + k={k} guesses")
    out = torch.empty(1, T + max_new_tokens + k + 1, dtype=ids.dtype, device=ids.device)  # room for a last round
    out[:, :T] = ids
    stats = SpeculativeOutput(ids, T, 0, 0, 0, 0)
    if max_new_tokens == 0:
        return stats
    tw, tcache = lean_weights(model), model.make_cache("static", 1, T + max_new_tokens + k)
    dw, dcache = lean_weights(draft), draft.make_cache("static", 1, T + max_new_tokens + k)
    out[:, T] = prefill(model, ids, cache=tcache).argmax(dim=-1)  # the target's first token
    prefill(draft, ids, cache=dcache)
    n, draft_fed = T + 1, T  # tokens so far; the draft has read out[:, :draft_fed]
    while n < T + max_new_tokens:
        # the draft catches up on the tokens it has not read (1, or 2 after a round with every guess kept) ...
        pending = torch.arange(draft_fed, n, device=ids.device)
        guess = lean_forward(dw, dcache.keys, dcache.values, out[:, draft_fed:n], pending)[:, -1].argmax(-1)  # (1,)
        guesses = torch.cat([guess[:, None], decode_tokens(dw, dcache.keys, dcache.values, guess,
                                                           pending[-1:] + 1, k - 1)], dim=1)  # (1, k)
        # ... and the target scores its last token and the k guesses in one forward
        checked = torch.cat([out[:, n - 1 : n], guesses], dim=1)  # (1, k + 1)
        logits = lean_forward(tw, tcache.keys, tcache.values, checked, torch.arange(n - 1, n + k, device=ids.device))
        n_accepted, next_token = accept_greedy(guesses, logits)  # (1,), (1,): the agreeing prefix, then its own
        accepted = int(n_accepted)  # the host sync of the round
        out[:, n : n + accepted + 1] = torch.cat([guesses[:, :accepted], next_token[:, None]], dim=1)
        stats.proposed, stats.accepted, stats.target_calls = stats.proposed + k, stats.accepted + accepted, \
            stats.target_calls + 1
        stats.rejected += accepted < k
        draft_fed = n + min(accepted, k - 1)  # the draft read every guess but its last
        n += accepted + 1
    stats.sequences = out[:, : T + max_new_tokens]
    return stats
