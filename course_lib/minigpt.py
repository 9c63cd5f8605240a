"""GPT-2 from scratch in one file (nanoGPT style), running the storyteller's own weights with an explicit KV cache.

``MiniGPT`` speaks the same forward protocol as a transformers causal LM (``input_ids``, ``attention_mask``,
``position_ids``, ``cache``, ``logits_to_keep``; an output with ``.logits``), so every decoder in
``course_lib.decoding`` runs on it unchanged, and its caches (``course_lib.kv_cache``) are plain objects you can
open and read::

    model = MiniGPT.from_pretrained("storyteller")      # or MiniGPT.from_hf(hf_model): the SAME weights
    cache = model.make_cache("static", max_len=128)     # or "dynamic"
    logits = prefill(model, ids, None, cache)           # course_lib.decoding: (B, vocab), the whole prompt
    logits = decode_step(model, next_ids, None, cache)  # (B, vocab): one new token per row, reading the cache

A prefill and a decode step are the same forward pass over T tokens or 1 token: prefill does a lot of work per
weight read (compute-bound), decode does little (memory-bound); that difference is the whole story of
generation speed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from course_lib.devices import model_device
from course_lib.kv_cache import DynamicKVCache, KVCache, StaticKVCache
from course_lib.models import check_fits

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
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

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
                   cfg.get("layer_norm_epsilon", 1e-5), act, cfg.get("bos_token_id"), cfg.get("eos_token_id"),
                   cfg.get("pad_token_id"))


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


@dataclass
class LMOutput:
    """What ``MiniGPT.forward`` returns, with transformers' field names, so one decode loop reads both."""

    logits: torch.Tensor  # (B, T, vocab), or the last logits_to_keep positions
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, each block's output; the last after ln_f


class MiniGPT(nn.Module):
    """A GPT-2 language model whose forward pass takes an explicit KV cache."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.generation_config = cfg  # EOS, pad and BOS ids, where the decoders look for them
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embeddings, also the output head (tied)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)  # learned position embeddings
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None, use_cache: bool = True,
                logits_to_keep: int = 0, output_hidden_states: bool = False) -> LMOutput:
        """Logits (B, T, vocab) of the T tokens ``input_ids`` (B, T) that follow the ``cache``'s stored ones.

        ``attention_mask`` (B, cached + T): 1 = real token, 0 = left padding. ``position_ids`` (B, T): default
        counts real tokens. ``logits_to_keep=1`` computes the last position's logits only (all generation needs
        from a prompt). ``use_cache=False`` ignores ``cache``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        cache = cache if use_cache else None
        past = 0 if cache is None else cache.get_seq_length()
        check_fits(self, past + T, what=f"{past} cached + {T} new tokens")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (batch, cached + new tokens) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        n_keys = past + T if cache is None or cache.capacity is None else cache.capacity
        mask, positions = attention_layout(past, T, n_keys, attention_mask, input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions if position_ids is None else position_ids)  # (B, T, C)
        hidden = []
        for layer, block in enumerate(self.h):
            hidden.append(x)
            x = block(x, layer, cache, mask)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        hidden.append(x)
        logits = F.linear(x[:, -logits_to_keep:], self.wte.weight)  # (B, T or logits_to_keep, vocab)
        return LMOutput(logits, tuple(hidden) if output_hidden_states else None)

    def make_cache(self, kind: str = "dynamic", batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty KV cache: "dynamic" (grows) or "static" (``max_len`` slots for ``batch`` rows, default the
        context window)."""
        cfg = self.config
        if kind == "dynamic":
            return DynamicKVCache(cfg.n_layer)
        if kind == "static":
            return StaticKVCache(cfg.n_layer, batch, cfg.n_head, cfg.head_dim, max_len or cfg.n_positions,
                                 dtype=self.wte.weight.dtype, device=model_device(self))
        raise ValueError(f"unknown cache kind {kind!r}; allowed: 'dynamic', 'static'")

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
        """The same weights (copied into nn.Linear layout) and EOS/pad/BOS ids as a transformers
        ``GPT2LMHeadModel``."""
        ids = {name: getattr(hf_model.generation_config, name) for name in ("bos_token_id", "eos_token_id",
                                                                             "pad_token_id")}
        return cls.from_state_dict({**hf_model.config.to_dict(), **ids}, hf_model.state_dict())

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
