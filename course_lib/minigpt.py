"""GPT-2 from scratch in one file (nanoGPT style), running the storyteller's own weights with an explicit KV cache.

``model.generate()`` hides the two things that make generation fast: the KV cache and a short loop. Here both
are in plain sight::

    model = MiniGPT.from_pretrained("storyteller")      # or MiniGPT.from_hf(hf_model): the SAME weights
    cache = new_cache(model, "static", batch=1, max_len=128)
    logits = prefill(model, ids, cache)                 # (B, vocab): the whole prompt in one forward pass
    logits = decode_step(model, next_ids, cache)        # (B, vocab): one new token per row, reading the cache
    out = generate(model, ids, max_new_tokens=64)       # greedy, no host sync per token, output preallocated

``prefill`` and ``decode_step`` are the same forward pass over T tokens or 1 token: prefill does a lot of work
per weight read (compute-bound), decode does little (memory-bound); that difference is the whole story of
generation speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.checks import check, is_integer
from course_lib.devices import model_device, to_model_device
from course_lib.kv_cache import DynamicKVCache, StaticKVCache
from course_lib.models import check_fits, check_token_ids

ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}  # name -> F.gelu approximate=


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int  # the context: position embeddings exist for this many tokens
    vocab_size: int
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, cfg: dict) -> "GPTConfig":
        """From a GPT-2 ``config.json`` (dict); refuses GPT-2 options this file does not implement."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"MiniGPT runs GPT-2 models only, got model_type={cfg.get('model_type')!r}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if cfg.get(flag):
                raise ValueError(f"MiniGPT does not implement the GPT-2 option {flag}=True")
        for flag in ("scale_attn_weights", "tie_word_embeddings"):
            if not cfg.get(flag, True):
                raise ValueError(f"MiniGPT does not implement the GPT-2 option {flag}=False")
        if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
            raise ValueError(f"MiniGPT assumes an MLP of 4 x n_embd, got n_inner={cfg['n_inner']}")
        act = cfg.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {act!r}; allowed: {', '.join(ACTIVATIONS)}")
        return cls(cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"],
                   cfg.get("layer_norm_epsilon", 1e-5), act)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # queries, keys and values in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, layer: int, cache, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hd): the past tokens' keys/values plus the new ones
        # softmax(q k^T / sqrt(hd) + mask) v, where the mask says which of the S keys each query may see
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.approximate = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, layer: int, cache, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))


def attention_layout(past: int, T: int, n_keys: int, attention_mask: torch.Tensor | None,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each new query may see, and the position of each new token.

    ``attention_mask`` (B, past + T) marks real tokens 1 and left padding 0 (None: no padding). Returns
    ``mask`` (B or 1, 1, T, n_keys) bool and ``positions`` (B or 1, T). Key slot j is visible to the query in
    slot past + i when j <= past + i (causal; this also hides a static cache's unwritten slots) and j is a real
    token. A padding query may see itself, so that no softmax row is all -inf (that would give NaN).
    """
    q_slot = past + torch.arange(T, device=device)  # (T,)
    k_slot = torch.arange(n_keys, device=device)  # (S,)
    visible = k_slot[None, :] <= q_slot[:, None]  # (T, S)
    if attention_mask is None:
        return visible[None, None], q_slot[None]
    real = attention_mask.bool()  # (B, past + T)
    # Positions count real tokens only, so a left-padded row gets the same position embeddings as unpadded.
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
    real = F.pad(real, (0, n_keys - real.shape[1]))  # (B, S): slots beyond the new tokens are masked anyway
    mask = (visible[None] & real[:, None, :]) | (k_slot[None, :] == q_slot[:, None])[None]  # (B, T, S)
    return mask[:, None], positions


class MiniGPT(nn.Module):
    """A GPT-2 language model whose forward pass takes an explicit KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embeddings, also the output head (tied)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)  # learned position embeddings
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) of the T tokens ``ids`` (B, T) that follow the ``cache.length`` cached ones.

        ``attention_mask`` (B, cache.length + T): 1 = real token, 0 = left padding. ``last_only`` computes the
        logits of the last position only (B, 1, vocab): all that generation needs from a prompt.
        """
        if ids.dim() != 2:
            raise ValueError(f"ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        B, T = ids.shape
        past = 0 if cache is None else cache.length
        check_fits(self, past + T, what=f"{past} cached + {T} new tokens")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (batch, cached + new tokens) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        n_keys = past + T if cache is None or cache.capacity is None else cache.capacity
        mask, positions = attention_layout(past, T, n_keys, attention_mask, ids.device)
        x = self.wte(ids) + self.wpe(positions)  # (B, T, C)
        for layer, block in enumerate(self.h):
            x = block(x, layer, cache, mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): skip the vocab projection of every prompt token
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, vocab)

    @classmethod
    def from_state_dict(cls, config: dict, state_dict: dict[str, torch.Tensor]) -> "MiniGPT":
        """Build from a GPT-2 config dict and a transformers GPT2LMHeadModel state dict."""
        model = cls(GPTConfig.from_dict(config))
        ours = {}
        for name, tensor in state_dict.items():
            name = name.removeprefix("transformer.")
            if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the head is tied to wte; old checkpoints store the causal mask as a buffer
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                tensor = tensor.t()  # GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
            ours[name] = tensor
        model.load_state_dict(ours, strict=True)
        param = next(iter(state_dict.values()))
        return model.to(device=param.device, dtype=param.dtype).eval()

    @classmethod
    def from_hf(cls, hf_model) -> "MiniGPT":
        """The same weights as a transformers ``GPT2LMHeadModel`` (copied into nn.Linear layout)."""
        return cls.from_state_dict(hf_model.config.to_dict(), hf_model.state_dict())

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "storyteller") -> "MiniGPT":
        """Load a bundled GPT-2 model by name, or a folder with config.json + model.safetensors (no transformers)."""
        from safetensors.torch import load_file

        from course_lib.models import BUNDLED_MODELS, bundled_path

        folder = bundled_path(name_or_path) if name_or_path in BUNDLED_MODELS else Path(name_or_path)
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise ValueError(f"{folder} has no config.json + model.safetensors; pass a bundled name "
                             f"({', '.join(BUNDLED_MODELS)}) or a GPT-2 model folder")
        config = json.loads((folder / "config.json").read_text())
        return cls.from_state_dict(config, load_file(folder / "model.safetensors"))


def new_cache(model: MiniGPT, kind: str = "dynamic", batch: int = 1, max_len: int | None = None):
    """An empty KV cache for ``model``: "dynamic" (grows) or "static" (``max_len`` slots, default the context)."""
    cfg = model.config
    if kind == "dynamic":
        return DynamicKVCache(cfg.n_layer)
    if kind == "static":
        return StaticKVCache(cfg.n_layer, batch, cfg.n_head, cfg.head_dim, max_len or cfg.n_positions,
                             dtype=model.wte.weight.dtype, device=model_device(model))
    raise ValueError(f"unknown cache kind {kind!r}; allowed: 'dynamic', 'static'")


@torch.inference_mode()
def prefill(model: MiniGPT, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt ``ids`` (B, T) through the model in one pass, filling ``cache``; next-token logits (B, vocab)."""
    ids, attention_mask = to_model_device(model, ids, attention_mask)
    return model(ids, cache, attention_mask, last_only=True)[:, -1]


@torch.inference_mode()
def decode_step(model: MiniGPT, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One new token per row, ``ids`` (B, 1), attending to everything in ``cache``; next-token logits (B, vocab)."""
    ids, attention_mask = to_model_device(model, ids, attention_mask)
    return model(ids, cache, attention_mask)[:, -1]


@torch.inference_mode()
def generate(model: MiniGPT, ids: torch.Tensor, max_new_tokens: int, cache="dynamic",
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy generation of exactly ``max_new_tokens`` per row; returns (B, T + max_new_tokens).

    ``cache``: "dynamic", "static", a cache object that already holds earlier tokens (a shared prefix), or None
    to re-run the model over the whole sequence at every step (the quadratic baseline). ``attention_mask``
    (B, cached + T) marks left padding with 0. Like gpt-fast, the loop has no EOS check, so it never waits for
    the device (no ``.item()``); cut the rows at EOS afterwards.
    """
    check("max_new_tokens", max_new_tokens, is_integer(max_new_tokens) and max_new_tokens >= 1, "an integer >= 1")
    check_token_ids(model, ids)
    B, T = ids.shape
    past = 0 if cache is None or isinstance(cache, str) else cache.length
    check_fits(model, past + T + max_new_tokens, what=f"{past} cached + {T} prompt tokens + max_new_tokens")
    if isinstance(cache, str):
        cache = new_cache(model, cache, B, T + max_new_tokens)
    ids, attention_mask = to_model_device(model, ids, attention_mask)
    out = torch.empty(B, T + max_new_tokens, dtype=ids.dtype, device=ids.device)  # filled in place, no cat
    out[:, :T] = ids
    full_mask = None  # no padding: the causal mask alone will do
    if attention_mask is not None:
        full_mask = torch.ones(B, past + T + max_new_tokens, dtype=torch.long, device=ids.device)
        full_mask[:, : past + T] = attention_mask

    def mask_upto(n: int) -> torch.Tensor | None:
        return None if full_mask is None else full_mask[:, :n]

    if cache is None:
        logits = model(ids, None, mask_upto(T), last_only=True)[:, -1]  # (B, vocab)
    else:
        logits = prefill(model, ids, cache, mask_upto(past + T))
    for i in range(max_new_tokens):
        out[:, T + i] = logits.argmax(dim=-1)  # (B,)
        if i == max_new_tokens - 1:
            break
        n = past + T + i + 1  # tokens in the sequence so far, cached or not
        if cache is None:  # no cache: run the model over everything again
            logits = model(out[:, : T + i + 1], None, mask_upto(n), last_only=True)[:, -1]
        else:
            logits = decode_step(model, out[:, T + i : T + i + 1], cache, mask_upto(n))
    return out
