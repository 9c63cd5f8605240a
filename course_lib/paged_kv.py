"""A paged KV cache: keys and values in fixed-size blocks, a block table per sequence (Kwon et al. 2023,
"Efficient Memory Management for Large Language Model Serving with PagedAttention", arXiv:2309.06180).

A static cache reserves ``max_len`` slots for every row from the start; most of them are never used when
outputs have different lengths. A paged cache keeps one pool of blocks of ``block_size`` token slots; a
sequence takes a block only when it needs one, and gives all of them back when it ends::

    cache = PagedKVCache(n_layers=6, n_heads=6, head_dim=32, num_blocks=64, block_size=16)
    cache.add(seq=7)                  # an empty block table for sequence 7
    slots = cache.append(7, 5)        # room for 5 more tokens: (5,) physical slots to write their keys into
    cache.keys[layer][slots] = k      # keys/values: (L, num_blocks * block_size, heads, head_dim)
    cache.context_slots(7)            # (length,): the physical slot of each of its tokens, in order
    cache.free(7)                     # its blocks go back to the free list

A physical slot is ``block * block_size + offset``; the block table maps a sequence's logical block i to its
physical block. Attention reads a sequence's keys through that table (here with one gather).
"""

from __future__ import annotations

import torch

from course_lib.checks import check_arg, is_integer


class CacheFullError(RuntimeError):
    """No free block left: the scheduler must wait for a sequence to finish (or preempt one)."""


class PagedKVCache:
    """A pool of ``num_blocks`` blocks of ``block_size`` token slots for keys and values of every layer."""

    def __init__(self, n_layers: int, n_heads: int, head_dim: int, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        for name, value in dict(n_layers=n_layers, n_heads=n_heads, head_dim=head_dim, num_blocks=num_blocks,
                                block_size=block_size).items():
            check_arg(name, value, is_integer(value) and value >= 1, "an integer >= 1")
        self.block_size = block_size
        shape = (n_layers, num_blocks * block_size, n_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # (L, slots, heads, head_dim)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes the lowest free block
        self.block_tables: dict[int, list[int]] = {}  # sequence -> its physical blocks, in logical order
        self.lengths: dict[int, int] = {}  # sequence -> tokens stored

    def add(self, seq: int) -> None:
        """Start an empty sequence."""
        if seq in self.block_tables:
            raise ValueError(f"sequence {seq} is already in the cache")
        self.block_tables[seq], self.lengths[seq] = [], 0

    def blocks_needed(self, seq: int | None, n: int) -> int:
        """How many new blocks ``n`` more tokens of ``seq`` (None: a new sequence) would take."""
        length = 0 if seq is None else self.lengths[seq]
        have = 0 if seq is None else len(self.block_tables[seq])
        return max(0, -(-(length + n) // self.block_size) - have)

    def append(self, seq: int, n: int = 1) -> torch.LongTensor:
        """Make room for ``n`` more tokens of ``seq``; return their physical slots (n,), in order."""
        need = self.blocks_needed(seq, n)
        if need > len(self.free_blocks):
            raise CacheFullError(f"sequence {seq} needs {need} more blocks, {len(self.free_blocks)} are free")
        table = self.block_tables[seq]
        table += [self.free_blocks.pop() for _ in range(need)]
        start = self.lengths[seq]
        self.lengths[seq] = start + n
        return self.slots(seq, start, start + n)

    def slots(self, seq: int, start: int, end: int) -> torch.LongTensor:
        """Physical slots of the tokens ``start .. end - 1`` of ``seq``: (end - start,)."""
        table = torch.tensor(self.block_tables[seq], dtype=torch.long)
        logical = torch.arange(start, end)
        return (table[logical // self.block_size] * self.block_size + logical % self.block_size).to(self.keys.device)

    def context_slots(self, seq: int) -> torch.LongTensor:
        """Physical slots of every token of ``seq`` so far, in order: (length,)."""
        return self.slots(seq, 0, self.lengths[seq])

    def free(self, seq: int) -> None:
        """The sequence has ended: its blocks go back to the free list (their contents are simply overwritten)."""
        self.free_blocks += reversed(self.block_tables.pop(seq))
        del self.lengths[seq]

    @property
    def block_bytes(self) -> int:
        """Bytes one block holds: keys and values of ``block_size`` tokens in every layer."""
        return 2 * self.keys[:, : self.block_size].nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks sequences hold now (the rest of the pool is free for others)."""
        return self.block_bytes * sum(len(table) for table in self.block_tables.values())
