"""The course's text data: one story reader, the held-out and themed stories shipped with the package, and the
encoders that turn stories and prompts into token ids.

A corpus is plain text, each story followed by a line holding exactly ``<|endoftext|>`` (EOS). That token is
also the bundled tokenizer's BOS and pad, so a prompt starts with it, as every story after the first does in
the training stream (``encode_prompts``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from course_lib.models import ASSETS_DIR, EOS_TOKEN

HELDOUT_FILE = ASSETS_DIR / "heldout_stories.txt"
THEMED_STORIES_FILE = ASSETS_DIR / "robot_stories.txt"
HELDOUT_FRACTION = 0.05


def parse_stories(text: str, source: str = "text") -> list[str]:
    """Split text into stories at lines that hold exactly ``<|endoftext|>``; ``source`` names it in errors."""
    stories, current = [], []
    for line in text.splitlines():
        if line.strip() == EOS_TOKEN:
            if "".join(current).strip():
                stories.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    if "".join(current).strip():
        stories.append("\n".join(current).strip())
    if not stories:
        raise ValueError(f"{source} holds no stories separated by {EOS_TOKEN!r} lines")
    return stories


def read_stories(corpus: Path) -> list[str]:
    """The stories of a corpus file."""
    return parse_stories(Path(corpus).read_text(encoding="utf-8"), source=str(corpus))


def heldout_stories() -> list[str]:
    """Held-out stories shipped with the package (never seen in training), for quality checks."""
    return read_stories(HELDOUT_FILE)


def themed_stories() -> list[str]:
    """The 14 short "Pip the little robot" stories written for this course (original text, public domain)."""
    return read_stories(THEMED_STORIES_FILE)


def split_stories(stories: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded shuffle, then hold out 5 % of the stories (at least one) for validation."""
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(stories) * HELDOUT_FRACTION))
    val = [stories[i] for i in order[:n_val]]
    train = [stories[i] for i in order[n_val:]]
    return train, val


def encode_stories(tokenizer, stories: list[str]) -> torch.Tensor:
    """One long stream: story, EOS, story, EOS, ... as int64 ids."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for batch_start in range(0, len(stories), 512):
        for row in tokenizer(stories[batch_start : batch_start + 512])["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, target) windows over ``ids``, targets shifted by one: (N, T) each."""
    n_windows = (len(ids) - 1) // context
    x = ids[: n_windows * context].view(n_windows, context)  # (N, T)
    y = ids[1 : n_windows * context + 1].view(n_windows, context)  # (N, T)
    return x, y


def text_list(texts: str | Sequence[str], name: str) -> list[str]:
    """One string or a list of strings as a non-empty list; ``name`` says which argument was wrong."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return texts


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt`` after the start-of-story token (BOS = ``<|endoftext|>``)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    return [tokenizer.bos_token_id, *tokenizer(prompt)["input_ids"]]


def encode_prompts(tokenizer, prompts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as a left-padded batch (the side generation continues from): ids and attention mask, (B, T)."""
    texts = text_list(prompts, "prompts")
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, p) for p in texts]}, padding_side="left",
                          return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]
