"""Loading the course's models: bundled ones by short name, hub ones by hub id, local folders by path.

One call for all three::

    model, tokenizer = load_model("storyteller")        # bundled, works offline
    model, tokenizer = load_model("gpt2")               # from the Hugging Face Hub, needs the internet once
    model, tokenizer = load_model("path/to/folder")     # a folder with config.json + *.safetensors
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

import torch

from course_lib.devices import get_device

ASSETS_DIR = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
MODELS_DIR = ASSETS_DIR / "models"
HELDOUT_FILE = ASSETS_DIR / "heldout_stories.txt"
EOS_TOKEN = "<|endoftext|>"

BUNDLED_MODELS: dict[str, str] = {
    "storyteller": "GPT-2 architecture, 6 layers, the course's main model",
    "llama": "Llama architecture (RoPE, RMSNorm, SwiGLU), similar size, for ensembles",
    "draft": "GPT-2 architecture, 1 layer, several times cheaper: the draft for speculative decoding",
}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class UnknownModelError(ValueError):
    """The name is neither a bundled model, a model folder, nor a model on the hub."""


class HubUnreachableError(ConnectionError):
    """A hub model was asked for, but the Hugging Face Hub cannot be reached (offline)."""


class NotAModelError(ValueError):
    """A path exists but does not hold a safetensors model."""


def bundled_path(name: str) -> Path:
    return MODELS_DIR / name


def _bundled_hint() -> str:
    return ", ".join(f"'{n}'" for n in BUNDLED_MODELS)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept a torch dtype or one of the names in ``DTYPES``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def _check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise NotAModelError(f"{path} is a file, not a model folder; expected a folder with config.json and *.safetensors")
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise NotAModelError(
            f"{path} is not a model folder: expected config.json and *.safetensors weights "
            f"(found: {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub answers; False offline or with HF_HUB_OFFLINE set."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(f"{endpoint}/api/models?limit=1", timeout=timeout)
        return True
    except OSError:
        return False


def _hub_source(name: str) -> dict:
    """from_pretrained arguments for a hub id, or a clear error when it cannot be had."""
    if not _HUB_ID.match(name):
        close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}: not a bundled model ({_bundled_hint()}), not an existing folder, "
            f"and not a hub id of the form 'name' or 'owner/name'.{hint}"
        )
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return {"local_files_only": True}  # already downloaded once: works offline
    if not _hub_reachable():
        close = difflib.get_close_matches(name, BUNDLED_MODELS, n=1)
        hint = f" Did you mean the bundled '{close[0]}'?" if close else ""
        raise HubUnreachableError(
            f"{name!r} is not a bundled model and the Hugging Face Hub cannot be reached (offline, or "
            f"HF_HUB_OFFLINE=1), so it cannot be downloaded. Bundled models that work offline: "
            f"{_bundled_hint()}.{hint}"
        )
    return {}


def load_tokenizer(name_or_path: str = "storyteller"):
    """The tokenizer for a bundled model (all share one), a model folder or a hub id."""
    from transformers import AutoTokenizer

    if name_or_path in BUNDLED_MODELS:
        source, extra = TOKENIZER_DIR, {}
    elif Path(name_or_path).exists():
        source, extra = Path(name_or_path), {}
    else:
        source, extra = name_or_path, _hub_source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    return tokenizer


def load_model(name_or_path: str = "storyteller", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` (default: the best available).

    ``name_or_path`` is a bundled name (see ``BUNDLED_MODELS``), a folder with config.json and safetensors
    weights, or a Hugging Face Hub id such as ``"gpt2"``. Weights load only from safetensors and no remote code
    is ever run.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keeps "Loading weights" bars out of notebook outputs
    target = get_device(device)
    torch_dtype = resolve_dtype(dtype)
    if name_or_path in BUNDLED_MODELS:
        source, extra = bundled_path(name_or_path), {}
        if not (source / "model.safetensors").is_file():
            raise NotAModelError(f"bundled model {name_or_path!r} has no weights at {source}; reinstall the package "
                                 f"or train it with `course train --preset {name_or_path}`")
    elif Path(name_or_path).exists():
        source, extra = Path(name_or_path), {}
        _check_model_folder(source)
    else:
        source, extra = name_or_path, _hub_source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        source, use_safetensors=True, trust_remote_code=False, dtype=torch_dtype or torch.float32, **extra
    )
    tokenizer = load_tokenizer(name_or_path)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(target).eval(), tokenizer


def model_card(name: str) -> dict:
    """The training facts of a bundled model (parameters, held-out loss, ...)."""
    if name not in BUNDLED_MODELS:
        raise UnknownModelError(f"no model card for {name!r}; bundled models: {_bundled_hint()}")
    return json.loads((bundled_path(name) / "training.json").read_text())


def heldout_stories() -> list[str]:
    """Held-out stories shipped with the package (never seen in training), for quality checks."""
    text = HELDOUT_FILE.read_text(encoding="utf-8")
    return [s.strip() for s in text.split(f"\n{EOS_TOKEN}\n") if s.strip()]
