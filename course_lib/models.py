"""Loading the course's models: bundled ones by short name, hub ones by hub id, local folders by path.

One call for all three::

    model, tokenizer = load_model("storyteller")        # bundled, works offline
    model, tokenizer = load_model("gpt2")               # from the Hugging Face Hub, needs the internet once
    model, tokenizer = load_model("path/to/folder")     # a folder with config.json + *.safetensors
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from pathlib import Path

import torch

from course_lib.devices import get_device

ASSETS_DIR = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
MODELS_DIR = ASSETS_DIR / "models"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")  # a vocabulary

BUNDLED_MODELS: dict[str, str] = {
    "storyteller": "GPT-2 architecture, 6 layers, the course's main model",
    "llama": "Llama architecture (RoPE, RMSNorm, SwiGLU), similar size, for ensembles",
    "draft": "GPT-2 architecture, 1 layer, several times cheaper: the draft for speculative decoding",
    "draft_distilled": "the draft's size, distilled from the storyteller: a draft that agrees with it more often",
    "draft_long": "draft_distilled's recipe without the teacher: the control that separates distillation from length",
}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


class BosIsNotPadding(logging.Filter):
    """Drop transformers' "your input_ids may be padded" warning where the pad id is the BOS id.

    transformers warns when an input with no attention mask starts with the pad id, and ``generate()`` drops an
    all-ones mask before the forward. Every course prompt starts with BOS (``course_lib.data.encode_prompt``), and
    the bundled models' pad id is their BOS id, so there the warning is a false alarm (its own text says it may be
    ignored then). Any other warning, and this one for a model whose pad id differs from its BOS id, still shows.
    """

    _SAME = re.compile(r"`pad_token_id` \((\d+)\) is identical to the `bos_token_id` \((\d+)\)")

    def filter(self, record: logging.LogRecord) -> bool:
        found = self._SAME.search(record.getMessage())
        return not (found and found.group(1) == found.group(2))


logging.getLogger("transformers.modeling_utils").addFilter(BosIsNotPadding())


class UnknownModelError(ValueError):
    """The name is neither a bundled model, a model folder, nor a model on the hub."""


class HubUnreachableError(ConnectionError):
    """A hub model was asked for, but the Hugging Face Hub cannot be reached (offline)."""


class NotAModelError(ValueError):
    """A path exists but does not hold a safetensors model (config.json, weights, tokenizer files)."""


class WeightsMismatchError(ValueError):
    """The safetensors weights do not fit the architecture that config.json describes."""


class ContextLengthError(ValueError):
    """The tokens do not fit the model's context window (its learned positions end there)."""


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
    if isinstance(source, Path) and source.is_dir() and not any((source / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build a tokenizer that knows one token and encodes every text as garbage
        raise NotAModelError(f"{source} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}; save the "
                             f"model's tokenizer there (tokenizer.save_pretrained(folder))")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    return tokenizer


def _check_loading_info(source, info: dict) -> None:
    """Refuse weights that leave part of the model random (missing or resized tensors) or go unused (unexpected):
    transformers only logs these and hands back a model that writes noise."""
    kinds = {"missing": "missing_keys", "unexpected": "unexpected_keys", "of the wrong shape": "mismatched_keys"}
    found = {kind: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
             for kind, key in kinds.items()}
    detail = "; ".join(f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})" for kind, keys in found.items() if keys)
    if detail:
        raise WeightsMismatchError(f"the weights in {source} do not fit the architecture its config.json describes: "
                                   f"{detail}. Check that config.json and the *.safetensors belong to one model")


def load_model(name_or_path: str = "storyteller", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` in eval mode on ``device`` (default: the best available).

    ``name_or_path`` is a bundled name (see ``BUNDLED_MODELS``), a folder with config.json, safetensors
    weights and the tokenizer's files, or a Hugging Face Hub id such as ``"gpt2"``. Weights load only from
    safetensors and no remote code is ever run. Weights that do not fit the config (missing, unexpected or
    resized tensors) raise ``WeightsMismatchError``.
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
    tokenizer = load_tokenizer(name_or_path)  # first: a folder without tokenizer fails before the weights load
    model, info = AutoModelForCausalLM.from_pretrained(
        source, use_safetensors=True, trust_remote_code=False, dtype=torch_dtype or torch.float32,
        output_loading_info=True, ignore_mismatched_sizes=True, **extra
    )
    _check_loading_info(source, info)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(target).eval(), tokenizer


def model_card(name: str) -> dict:
    """The training facts of a bundled model (parameters, held-out loss, ...)."""
    if name not in BUNDLED_MODELS:
        raise UnknownModelError(f"no model card for {name!r}; bundled models: {_bundled_hint()}")
    return json.loads((bundled_path(name) / "training.json").read_text())


# ----------------------------------------------------------------------------- what a model accepts


def _text_config(model):
    """The config of the token stream: the decoder's, for configs that nest several (multimodal models)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def context_window(model) -> int:
    """How many positions the model has: ``n_positions`` (GPT-2, MiniGPT) or ``max_position_embeddings`` (Llama).

    GPT-2 looks positions up in a table of that many rows and fails past it with a bare IndexError; Llama's
    rotary embeddings compute any position, so it would run on silently, into positions it never trained on.
    """
    config = _text_config(model)
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"{type(model).__name__} config has neither n_positions nor max_position_embeddings")


def check_fits(model, n_tokens: int, what: str = "prompt") -> None:
    """Raise ``ContextLengthError`` when ``n_tokens`` positions exceed the context window."""
    window = context_window(model)
    if n_tokens > window:
        raise ContextLengthError(
            f"{what} needs {n_tokens} tokens but {type(model).__name__} has a context window of {window}; "
            f"shorten it by {n_tokens - window} tokens (e.g. drop the oldest text or few-shot examples)"
        )


def check_token_ids(model, input_ids) -> None:
    """Clear errors for ids the model's embedding cannot look up: not an integer tensor of shape (batch, length)
    with batch, length >= 1, or an id outside ``0 .. vocab_size - 1``. One host sync (the min and the max)."""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}; "
                         f"pass the tokenizer's ids")
    if input_ids.ndim != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids must be (batch, length) with batch >= 1 and length >= 1, "
                         f"got shape {tuple(input_ids.shape)}")
    vocab = _text_config(model).vocab_size
    low, high = torch.stack(torch.aminmax(input_ids)).tolist()
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary of "
                         f"{type(model).__name__}: ids must be in 0..{vocab - 1}; encode with the model's own tokenizer")


# ----------------------------------------------------------------------------- several GPUs, one model


class NotEnoughGPUsError(RuntimeError):
    """Spreading one model over several GPUs was asked for on a machine with fewer GPUs."""


def load_across_gpus(name_or_path: str = "storyteller", min_gpus: int = 2):
    """Load a transformers model split layer by layer over all visible GPUs with accelerate's ``device_map="auto"``.

    This replaced ``model.parallelize()`` (removed from transformers). Each GPU holds some of the layers and
    the activations travel from one GPU to the next: it makes a model fit that one GPU cannot hold, it does
    not make one request faster. ``model.hf_device_map`` tells where each layer went.
    """
    found = torch.cuda.device_count()
    if found < min_gpus:
        raise NotEnoughGPUsError(
            f"device_map='auto' spreads a model over several GPUs, but this machine has {found} CUDA GPU(s) "
            f"(need {min_gpus}). On one device use course_lib.load_model(...); run this on a machine with "
            f">= {min_gpus} GPUs to see the layers placed on cuda:0, cuda:1, ...")
    from transformers import AutoModelForCausalLM

    source = bundled_path(name_or_path) if name_or_path in BUNDLED_MODELS else name_or_path
    return AutoModelForCausalLM.from_pretrained(source, device_map="auto", use_safetensors=True,
                                                trust_remote_code=False).eval()
