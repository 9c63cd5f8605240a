"""KV caches: the keys and values of past tokens, kept so that each new token costs one token's work.

Without a cache, producing token t re-runs the model over all t tokens before it: the total work of n new tokens
grows like n^2. Attention only ever needs the past tokens' keys and values, which never change, so a cache
stores them and the model runs over the one new token (Pope et al. 2022, arXiv:2211.05102).

Two caches with one interface (their base class ``KVCache``), used by ``course_lib.minigpt``. The interface is
the one ``course_lib.decoding`` already uses on transformers' caches, so every decoder runs on either model:

- ``DynamicKVCache`` grows: every step concatenates the new keys (like transformers' ``DynamicCache``).
  Memory follows the tokens really stored, but each step allocates and copies.
- ``StaticKVCache`` is preallocated for ``max_len`` tokens and written in place (like ``StaticCache``, and
  gpt-fast's cache): fixed shapes, no allocation per step (what ``torch.compile`` wants), but it holds memory
  for ``max_len`` tokens from the start, used or not (the waste PagedAttention removes: Kwon et al. 2023,
  arXiv:2309.06180).

The interface (the forward pass calls ``update`` once per layer, then ``advance`` once)::

    cache.get_seq_length()            # tokens stored so far (an int on the host: reading it never syncs)
    k_all, v_all = cache.update(layer, k, v)   # k, v: (B, heads, T, head_dim) of the T new tokens
    cache.advance(T)                  # after the last layer: the T new tokens now count as stored
    cache.crop(n)                     # keep the first n tokens; crop(-n) drops the last n (rejected drafts)
    cache.reorder_cache(rows)         # keep / reorder / repeat batch rows (beam search, contrastive search)
    cache.clone()                     # an independent copy (reuse a shared prompt prefix)
    cache.nbytes                      # bytes the key/value tensors hold, measured
"""

from __future__ import annotations

import torch


def kv_cache_bytes(n_layers: int, n_heads: int, head_dim: int, tokens: int, batch: int = 1,
                   bytes_per_value: int = 4) -> int:
    """The KV-cache size formula: 2 (keys and values) x layers x heads x head_dim x tokens x batch x bytes."""
    for name, value in dict(n_layers=n_layers, n_heads=n_heads, head_dim=head_dim, batch=batch,
                            bytes_per_value=bytes_per_value).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
    return 2 * n_layers * n_heads * head_dim * tokens * batch * bytes_per_value


def measured_bytes(cache) -> int:
    """Bytes held by the key/value tensors of a course cache or a transformers ``Cache`` (DynamicCache, StaticCache)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    if hasattr(cache, "layers"):  # transformers 5.x: one layer object per decoder layer, keys/values tensors
        return sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
    raise TypeError(f"cannot measure a {type(cache).__name__}: expected a course KV cache or a transformers Cache")


def _check_new(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"keys and values must both be (batch, heads, tokens, head_dim); got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")


class KVCache:
    """What both caches share: ``length`` (tokens stored), ``capacity`` (slots, None = grows), advance and crop."""

    length: int = 0
    capacity: int | None = None

    def get_seq_length(self) -> int:
        """Tokens stored so far (the name transformers' caches use, so one decode loop reads both)."""
        return self.length

    def advance(self, n: int) -> None:
        """Count the ``n`` tokens every layer has just written as stored."""
        self.length += n

    def crop(self, n: int) -> None:
        """Keep only the first ``n`` tokens; ``crop(-n)`` drops the last ``n`` (transformers' convention)."""
        keep = self.length + n if n < 0 else n
        if not 0 <= keep <= self.length:
            raise ValueError(f"cannot crop to {n} tokens: the cache holds {self.length}")
        self.length = keep


class DynamicKVCache(KVCache):
    """A cache that grows by concatenation: memory = tokens stored, one allocation + copy per step and layer."""

    def __init__(self, n_layers: int):
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # each (B, heads, length, head_dim)
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys/values of ``layer``; return all of them: (B, heads, length + T, head_dim)."""
        _check_new(k, v)
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k, v
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)  # a new tensor: copies the whole past
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def crop(self, n: int) -> None:
        super().crop(n)
        self.keys = [None if k is None else k[:, :, : self.length] for k in self.keys]
        self.values = [None if v is None else v[:, :, : self.length] for v in self.values]

    def reorder_cache(self, rows: torch.LongTensor) -> None:
        """Batch row i becomes old row ``rows[i]`` (B',): beams follow their parents, candidates get copies."""
        self.keys = [None if k is None else k.index_select(0, rows.to(k.device)) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, rows.to(v.device)) for v in self.values]

    def clone(self) -> "DynamicKVCache":
        copy = DynamicKVCache(len(self.keys))
        copy.keys = [None if k is None else k.clone() for k in self.keys]
        copy.values = [None if v is None else v.clone() for v in self.values]
        copy.length = self.length
        return copy

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values if t is not None)


class StaticKVCache(KVCache):
    """A cache preallocated for ``max_len`` tokens and written in place: fixed shapes, no allocation per step.

    ``crop`` frees nothing: the slots after the new length are simply overwritten later.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        kv_cache_bytes(n_layers, n_heads, head_dim, max_len, batch)  # validates the sizes
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, heads, max_len, head_dim)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens at [length, length + T); return the whole buffer: (B, heads, max_len, head_dim).

        Slots past ``length + T`` hold stale values: the attention mask must hide them (minigpt's does, since a
        query at position p sees only slots <= p).
        """
        _check_new(k, v)
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"static cache is full: it holds {self.capacity} tokens, {start} are stored and "
                             f"{k.shape[2]} more were written; allocate a larger max_len")
        if k.shape[:2] != self.keys.shape[1:3] or k.shape[3] != self.keys.shape[4]:
            raise ValueError(f"new keys {tuple(k.shape)} do not fit a cache of (batch, heads, ., head_dim) = "
                             f"{tuple(self.keys.shape[1:3])} x {self.keys.shape[4]}")
        self.keys[layer, :, :, start:end] = k
        self.values[layer, :, :, start:end] = v
        return self.keys[layer], self.values[layer]

    def reorder_cache(self, rows: torch.LongTensor) -> None:
        """Batch row i becomes old row ``rows[i]`` (B',); a new batch size reallocates the buffers."""
        self.keys = self.keys.index_select(1, rows.to(self.keys.device))  # (L, B', heads, max_len, head_dim)
        self.values = self.values.index_select(1, rows.to(self.values.device))

    def clone(self) -> "StaticKVCache":
        copy = object.__new__(StaticKVCache)
        copy.keys, copy.values = self.keys.clone(), self.values.clone()
        copy.capacity, copy.length = self.capacity, self.length
        return copy

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes
