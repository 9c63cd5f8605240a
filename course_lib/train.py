"""Train the course's bundled tokenizer and models from a plain-text corpus.

The corpus is a text file of stories, each followed by a line holding exactly ``<|endoftext|>``.
Reproduce the shipped models (same seed, same step counts) with::

    python -m course_lib.train --corpus ../shared/data/tinystories-4mb.txt --preset tokenizer
    python -m course_lib.train --corpus ../shared/data/tinystories-4mb.txt --preset storyteller
    python -m course_lib.train --corpus ../shared/data/tinystories-4mb.txt --preset llama
    python -m course_lib.train --corpus ../shared/data/tinystories-4mb.txt --preset draft

Everything is seeded; a run on the same torch build and thread count gives the same weights.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_lib.data import encode_stories, read_stories, split_stories
from course_lib.decoding.steps import no_padding_mask
from course_lib.devices import to_model_device
from course_lib.metrics import heldout_loss
from course_lib.models import ASSETS_DIR, EOS_TOKEN, TOKENIZER_DIR, load_model
SHIPPED_HELDOUT_STORIES = 60  # a small slice of held-out stories ships for quality checks in the notebooks


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved into the model card)."""

    name: str
    arch: str = "gpt2"  # "gpt2" or "llama"
    n_layer: int = 6
    n_embd: int = 192
    n_head: int = 6
    context: int = 256
    batch_size: int = 8
    steps: int = 1000
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_every: int = 250
    seed: int = 1234
    bf16: bool = True
    teacher: str | None = None  # a bundled model to distil from: the loss becomes KL(teacher || student)
    distill_temperature: float = 1.0  # softens both distributions (Hinton et al. 2015); the KL is scaled by T^2


PRESETS: dict[str, TrainConfig] = {
    "storyteller": TrainConfig(name="storyteller", arch="gpt2", n_layer=6, n_embd=192, n_head=6, steps=3000,
                               eval_every=500),
    "llama": TrainConfig(name="llama", arch="llama", n_layer=6, n_embd=192, n_head=6, steps=1500),
    "draft": TrainConfig(name="draft", arch="gpt2", n_layer=1, n_embd=128, n_head=2, steps=1500, lr=3e-3),
    # the draft's size, taught by the storyteller's distributions instead of the corpus's next tokens, for twice the
    # draft's steps (fp32: bf16 autocast runs 13x slower than fp32 on CPUs without native bf16)
    "draft_distilled": TrainConfig(name="draft_distilled", arch="gpt2", n_layer=1, n_embd=128, n_head=2, steps=3000,
                                   lr=3e-3, teacher="storyteller", bf16=False),
    # draft_distilled's recipe without the teacher: what the longer training alone buys (notebook 13 compares)
    "draft_long": TrainConfig(name="draft_long", arch="gpt2", n_layer=1, n_embd=128, n_head=2, steps=3000, lr=3e-3,
                              bf16=False),
}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(stories: list[str], vocab_size: int = 4096):
    """Train a byte-level BPE tokenizer whose id 0 is ``<|endoftext|>`` (EOS, BOS and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stories, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


# ----------------------------------------------------------------------------- models


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int):
    """A fresh, seeded GPT-2 or Llama causal LM of the configured size."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    common = dict(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if cfg.arch == "gpt2":
        config = GPT2Config(
            n_positions=cfg.context, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )
        return GPT2LMHeadModel(config)
    if cfg.arch == "llama":
        config = LlamaConfig(
            hidden_size=cfg.n_embd, intermediate_size=int(cfg.n_embd * 8 / 3) // 32 * 32,
            num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
            max_position_embeddings=cfg.context, tie_word_embeddings=True, **common,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"unknown arch {cfg.arch!r}; allowed: 'gpt2', 'llama'")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad; matrices decay, biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def random_windows(ids: torch.Tensor, context: int, batch_size: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of the stream: inputs and next-token targets, (B, T) each, on ``ids``' device.

    The starts come from the host generator ``gen``, so a seed picks the same windows on every device.
    """
    if len(ids) < context + 2:
        raise ValueError(f"the token stream has {len(ids)} tokens; windows of context {context} need at least {context + 2}")
    starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=gen).to(ids.device)
    window = ids[starts[:, None] + torch.arange(context + 1, device=ids.device)]  # (B, T+1)
    return window[:, :-1], window[:, 1:]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token, averaged, on distributions softened by ``temperature`` and scaled by
    T^2 so that its gradients keep their size (Hinton et al. 2015, arXiv:1503.02531). Logits: (N, vocab)."""
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * temperature**2


def train_step(model, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
               bf16: bool = True, teacher=None, temperature: float = 1.0) -> torch.Tensor:
    """One optimizer step on the next-token loss of ``x`` -> ``y`` (B, T), or, with a ``teacher`` model, on the KL
    to its next-token distributions (distillation: soft targets instead of the one true next token). Returns
    the loss (detached)."""
    x, y = to_model_device(model, x, y)
    model.train()
    for group in opt.param_groups:
        group["lr"] = lr
    # the mask: the EOS between stories (also the pad id) is text, and without one transformers warns
    mask = no_padding_mask(x)
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        logits = model(input_ids=x, attention_mask=mask).logits  # (B, T, vocab)
    if teacher is None:
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    else:
        with torch.no_grad():
            target = teacher(input_ids=x, attention_mask=mask).logits  # (B, T, vocab), fp32
        loss = distill_loss(logits.flatten(0, 1), target.flatten(0, 1), temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # frozen parameters (grad None) are skipped
    opt.step()
    return loss.detach()


def train_model(cfg: TrainConfig, train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int, eos_id: int,
                teacher=None):
    """Train for ``cfg.steps`` steps on random windows of the training stream (distilling from ``teacher`` if
    given); returns (model, log)."""
    model = build_model(cfg, vocab_size, eos_id)
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    log = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.name}")
    for step in bar:
        x, y = random_windows(train_ids, cfg.context, cfg.batch_size, gen)
        loss = train_step(model, opt, x, y, lr_at(step, cfg), cfg.bf16, teacher, cfg.distill_temperature)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            val, _ = heldout_loss(model, val_ids, cfg.context)
            log.append({"step": step + 1, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                        "minutes": round((time.perf_counter() - start) / 60, 2)})
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val:.3f}")
    return model.eval(), log


# ----------------------------------------------------------------------------- outputs


def write_card(out: Path, cfg: TrainConfig, facts: dict) -> None:
    """Model card: README.md for people, training.json for code."""
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), **facts}, indent=2) + "\n")
    lines = [
        f"# {cfg.name}",
        "",
        f"A small {cfg.arch.upper()}-architecture causal language model bundled with the Accelerated Generation course.",
        "Trained from scratch by `course_lib/train.py` on TinyStories (Eldan & Li 2023, arXiv:2305.07759,",
        "CDLA-Sharing-1.0): the first 5,063 stories of its training split, 5 % of them held out.",
        "",
        "| fact | value |",
        "|---|---|",
        f"| parameters | {facts['parameters']:,} |",
        f"| layers x width x heads | {cfg.n_layer} x {cfg.n_embd} x {cfg.n_head} |",
        f"| context | {cfg.context} tokens |",
        f"| tokens seen | {facts['tokens_seen']:,} ({facts['epochs']:.1f} epochs) |",
        f"| wall time | {facts['wall_minutes']:.1f} min on {facts['threads']} CPU threads (torch {facts['torch']}) |",
        f"| held-out loss | {facts['heldout_nats_per_token']:.3f} nats/token |",
        f"| held-out bits per byte | {facts['heldout_bits_per_byte']:.3f} |",
        f"| corpus sha256 | `{facts['corpus_sha256']}` |",
        "",
        f"Reproduce: `python -m course_lib.train --corpus tinystories-4mb.txt --preset {cfg.name}`",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def train_preset(corpus: Path, preset: str, out_root: Path = ASSETS_DIR, steps: int | None = None,
        max_stories: int | None = None) -> dict:
    """Train the tokenizer or one model preset from ``corpus`` and write it under ``out_root``."""
    from transformers import AutoTokenizer, GenerationConfig

    stories = read_stories(corpus)[:max_stories]
    train_stories, val_stories = split_stories(stories)
    tok_dir = out_root / TOKENIZER_DIR.name
    if preset == "tokenizer":
        tokenizer = train_tokenizer(train_stories)
        tokenizer.save_pretrained(tok_dir)
        heldout = out_root / "heldout_stories.txt"
        heldout.write_text("".join(s + f"\n{EOS_TOKEN}\n" for s in val_stories[:SHIPPED_HELDOUT_STORIES]))
        return {"tokenizer": str(tok_dir), "vocab_size": len(tokenizer)}
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: 'tokenizer', {', '.join(map(repr, PRESETS))}")
    cfg = PRESETS[preset]
    if steps is not None:
        cfg = TrainConfig(**{**asdict(cfg), "steps": steps, "eval_every": max(1, min(cfg.eval_every, steps))})
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    train_ids = encode_stories(tokenizer, train_stories)
    val_ids = encode_stories(tokenizer, val_stories)
    teacher = None
    if cfg.teacher is not None:  # the bundled teacher, or the one trained into out_root
        source = cfg.teacher if out_root == ASSETS_DIR else str(out_root / "models" / cfg.teacher)
        teacher = load_model(source, device="cpu")[0]
    start = time.perf_counter()
    model, log = train_model(cfg, train_ids, val_ids, len(tokenizer), tokenizer.eos_token_id, teacher)
    wall = time.perf_counter() - start
    val_loss, val_tokens = heldout_loss(model, val_ids, cfg.context)
    val_bytes = sum(len(s.encode("utf-8")) for s in val_stories) * val_tokens / len(val_ids)
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context,
        "epochs": cfg.steps * cfg.batch_size * cfg.context / len(train_ids),
        "wall_minutes": wall / 60,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "heldout_nats_per_token": val_loss,
        "heldout_bits_per_byte": val_loss * val_tokens / math.log(2) / val_bytes,
        "corpus_sha256": sha256_of(corpus),
        "train_stories": len(train_stories),
        "heldout_stories": len(val_stories),
        "log": log,
    }
    out = out_root / "models" / cfg.name
    model.save_pretrained(out, safe_serialization=True)
    if out_root != ASSETS_DIR:  # a folder elsewhere must be self-contained: load_model(out) refuses it without a
        tokenizer.save_pretrained(out)  # tokenizer; bundled models share the package's assets/tokenizer
    GenerationConfig(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.eos_token_id).save_pretrained(out)
    write_card(out, cfg, facts)
    return facts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="course train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="text file of stories separated by <|endoftext|> lines")
    parser.add_argument("--preset", required=True, choices=["tokenizer", *PRESETS])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="folder for tokenizer/ and models/ (default: the package's assets)")
    parser.add_argument("--steps", type=int, help="override the preset's step count (for quick trials)")
    parser.add_argument("--max-stories", type=int, help="use only the first N stories (for quick trials)")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        parser.error(f"corpus not found: {args.corpus}")
    facts = train_preset(args.corpus, args.preset, args.out, args.steps, args.max_stories)
    print(json.dumps({k: v for k, v in facts.items() if k != "log"}, indent=2))


if __name__ == "__main__":
    main()
