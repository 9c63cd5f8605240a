"""The fast path: greedy decoding of a ``MiniGPT`` with the per-token overhead taken out (gpt-fast's recipe).

    out = fast_greedy(model, input_ids, max_new_tokens=240)                          # lean eager steps
    out = fast_greedy(model, input_ids, max_new_tokens=240, compile=True, tokens_per_call=8)

At batch 1 a small model's decode step is mostly overhead: Python, ``nn.Module`` calls, one dispatch per
operation (notebook 12 profiles it). The arithmetic of one storyteller token is about 7 MFLOP, a fraction of a
millisecond. So this file removes overhead, one kind at a time:

- ``LeanWeights``: the model's weights as plain tensors in tuples, read once (no module calls, no attribute
  look-ups per token);
- the course's ``StaticKVCache`` written in place with ``index_copy_`` at a position held in a tensor, attention
  over all its slots with a mask ``slot <= position``: every step has the same shapes, so a compiled step never
  recompiles;
- ``decode_one_token``: one token through the model in a dozen operations per layer;
- ``decode_tokens``: ``n`` greedy steps in one call, the argmax fed straight back in, so a compiled graph covers
  ``n`` tokens and pays the call overhead once;
- no host sync in the loop: tokens are written into a preallocated output and never read by Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from course_lib.checks import check_arg, is_integer
from course_lib.decoding.prepare import GenerateOutput, prepare
from course_lib.decoding.steps import prefill
from course_lib.kv_cache import StaticKVCache
from course_lib.minigpt import ACTIVATIONS, MiniGPT
from course_lib.models import check_fits


@dataclass(frozen=True)
class LeanWeights:
    """A ``MiniGPT``'s weights as plain tensors (the same storage, no copies), in the order a step reads them."""

    wte: torch.Tensor  # (vocab, C): token embeddings, also the output head
    wpe: torch.Tensor  # (positions, C)
    layers: tuple[tuple[torch.Tensor, ...], ...]  # per block: ln_1 w, b; c_attn w, b; c_proj w, b; ln_2 w, b; fc w, b; proj w, b
    ln_f: tuple[torch.Tensor, torch.Tensor]
    n_head: int
    eps: float
    approximate: str  # F.gelu's approximate=


def lean_weights(model: MiniGPT) -> LeanWeights:
    """Read ``model``'s weights once into a ``LeanWeights``."""
    if not isinstance(model, MiniGPT):
        raise TypeError(f"model must be a course MiniGPT (MiniGPT.from_hf(hf_model) converts a transformers GPT-2), "
                        f"got {type(model).__name__}")
    layers = tuple(
        (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
         b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
         b.mlp.c_proj.weight, b.mlp.c_proj.bias)
        for b in model.h)
    cfg = model.config
    return LeanWeights(model.wte.weight, model.wpe.weight, layers, (model.ln_f.weight, model.ln_f.bias),
                       cfg.n_head, cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation_function])


def decode_one_token(w: LeanWeights, keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """Feed one token per row at position ``pos`` (1,), writing its keys/values into the static buffers
    ``keys``/``values`` (L, B, heads, S, hd) in place. Returns the logits (B, vocab)."""
    B, C = token.shape[0], w.wte.shape[1]
    nh = w.n_head
    x = (w.wte[token] + w.wpe[pos])[:, None]  # (B, 1, C)
    visible = (torch.arange(keys.shape[3], device=pos.device) <= pos)[None]  # (1, S): the slots written so far
    for i, (ln1w, ln1b, qkvw, qkvb, projw, projb, ln2w, ln2b, fcw, fcb, outw, outb) in enumerate(w.layers):
        h = F.layer_norm(x, (C,), ln1w, ln1b, w.eps)
        q, k, v = F.linear(h, qkvw, qkvb).view(B, 1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, 1, hd)
        keys[i].index_copy_(2, pos, k)  # the new token's key, in its slot: no allocation, no copy of the past
        values[i].index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=visible)  # (B, nh, 1, hd)
        x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), projw, projb)
        h = F.layer_norm(x, (C,), ln2w, ln2b, w.eps)
        x = x + F.linear(F.gelu(F.linear(h, fcw, fcb), approximate=w.approximate), outw, outb)  # (B, 1, C)
    x = F.layer_norm(x[:, 0], (C,), *w.ln_f, w.eps)  # (B, C)
    return F.linear(x, w.wte)  # (B, vocab)


def decode_tokens(w: LeanWeights, keys: torch.Tensor, values: torch.Tensor, token: torch.Tensor,
                  pos: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy steps from ``token`` (B,) at ``pos`` (1,): the next ``n`` tokens (B, n). A plain loop, so a
    compiled ``decode_tokens`` is one graph for ``n`` tokens."""
    out = []
    for _ in range(n):
        token = decode_one_token(w, keys, values, token, pos).argmax(dim=-1)  # (B,)
        out.append(token)
        pos = pos + 1
    return torch.stack(out, dim=1)  # (B, n)


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
    cache = StaticKVCache(len(w.layers), B, w.n_head, w.wte.shape[1] // w.n_head, slots, w.wte.dtype, ids.device)
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
