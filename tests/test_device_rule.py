"""Inputs follow the model: every public course_lib entry point that takes token tensors (or builds them from
text) reaches its model with every tensor on the model's device, whatever device the caller's tensors are on.

Proved without a GPU. The model is a copy on the ``meta`` device (shapes, no data), so CPU tensors are "on the
wrong device" for it. A forward pre-hook on the model checks that every tensor argument is on ``meta``, then
raises ``ReachedForward`` to stop the run (meta tensors cannot be read back, so nothing could continue). Each
entry point is called with CPU tensors and must end in ``ReachedForward``: a function that forgets to move an
input fails the hook's assertion, and one that mixes devices before its first forward fails on the way.

The move happens once, where the tensors are first used: a function that only hands them on to another entry
point (``complete`` -> ``greedy_search`` -> ``generate``) leaves the move to it, so validation reads the host
copy and costs no device sync. Where an entry point cannot reach a forward on ``meta`` for a genuine reason,
its case says why and checks the call it hands the tensors to instead.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from torch import nn
import course_lib
from course_lib import batching, ensembles, fastpath, finetune, measure, metrics, minigpt, perf_model, prefix_cache, prompting
from course_lib import train
from course_lib import paged_kv, serving, widgets
from course_lib.decoding import contrastive, diverse, fast, loop, sampling, search, speculative, steps
from course_lib.decoding.processors import RepetitionPenalty
from course_lib.models import load_tokenizer
from tiny_models import make_tiny_model

META = torch.device("meta")
VOCAB = 4096  # the bundled tokenizer's: prompting and widgets tokenize real text


class ReachedForward(Exception):
    """The sentinel: a forward (or the checked hand-off) was reached with every tensor on the model's device."""


def check_and_stop(where: str) -> Callable:
    """A stand-in for a forward: assert every tensor argument is on ``meta``, then stop the run."""

    def check(*args, **kwargs):
        tensors = [(f"argument {i}", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        tensors += [(name, v) for name, v in kwargs.items() if isinstance(v, torch.Tensor)]
        assert tensors, f"{where} was reached without any tensor"
        off = {name: str(t.device) for name, t in tensors if t.device != META}
        assert not off, f"{where} got tensors off the model's device ({META}): {off}"
        raise ReachedForward(where)

    return check


def stop_at_forward(module: nn.Module) -> None:
    check = check_and_stop(f"{type(module).__name__}.forward")
    module.register_forward_pre_hook(lambda mod, args, kwargs: check(*args, **kwargs), with_kwargs=True)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def cpu_models(request):
    """Tiny random target and draft on the CPU, with the bundled tokenizer's vocabulary."""
    return make_tiny_model(request.param, vocab_size=VOCAB), make_tiny_model(request.param, VOCAB, seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("storyteller")


MINI_CONFIG = minigpt.GPTConfig(n_layer=1, n_head=2, n_embd=8, n_positions=64, vocab_size=VOCAB)


@pytest.fixture
def setup(cpu_models, tokenizer):
    """Meta copies of the models, and CPU inputs: a left-padded batch of 2, its mask, a token stream."""
    model, draft = (copy.deepcopy(m).to(META) for m in cpu_models)
    with torch.device(META):
        mini = minigpt.MiniGPT(MINI_CONFIG)
    ids = torch.tensor([[0, 0, 5, 6, 7], [0, 3, 4, 5, 6]])  # (2, 5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert ids.device.type == mask.device.type == "cpu" and next(model.parameters()).device == META
    return SimpleNamespace(model=model, draft=draft, mini=mini, ids=ids, mask=mask, tokenizer=tokenizer,
                           stream=torch.arange(200) % 97)


@dataclass
class Case:
    call: Callable[[SimpleNamespace], object]  # the entry point, called with CPU tensors
    models: Callable[[SimpleNamespace], list[nn.Module]] = lambda s: [s.model]  # whose forward is checked
    stop_at: Callable[[SimpleNamespace], tuple[object, str]] | None = None  # the checked hand-off instead
    why: str = ""  # why this case checks a hand-off, not the forward

    def __post_init__(self):
        assert (self.stop_at is None) == (not self.why), "a case that stops at a hand-off must say why"


def the_mini(s: SimpleNamespace) -> list[nn.Module]:
    return [s.mini]


def both_models(s: SimpleNamespace) -> list[nn.Module]:
    return [s.model, s.draft]


GENERATE_VALIDATES = ("generate validates the token values (a host sync) on the tensors it is handed; these are "
                      "already on the model's device here, and meta tensors cannot be read: check the hand-off")


def _prefix_cache(s):
    """A non-empty MiniGPT prefix cache (built on the CPU; the run stops before it is read)."""
    return prefix_cache.build_prefix_cache(minigpt.MiniGPT(MINI_CONFIG), s.ids[:1])


def decoder_cases(model: str, models) -> dict[str, Case]:
    """The same decode stack on a transformers model ("model") and on MiniGPT ("mini")."""
    m = lambda s: getattr(s, model)  # noqa: E731
    return {
        "decoding.steps.forward": Case(lambda s: steps.forward(m(s), s.ids, s.mask, steps.new_cache(m(s))), models),
        "decoding.steps.prefill": Case(
            lambda s: steps.prefill(m(s), s.ids, s.mask, cache=steps.new_cache(m(s))), models),
        "decoding.steps.decode_step": Case(
            lambda s: steps.decode_step(m(s), s.ids[:, -1:], s.mask[:, -1:], cache=steps.new_cache(m(s))), models),
        "decoding.loop.generate": Case(lambda s: loop.generate(m(s), s.ids, s.mask, max_new_tokens=3), models),
        "decoding.fast.greedy_no_sync": Case(
            lambda s: fast.greedy_no_sync(m(s), s.ids, s.mask, max_new_tokens=3), models),
        "decoding.fast.greedy_without_cache": Case(
            lambda s: fast.greedy_without_cache(m(s), s.ids, s.mask, max_new_tokens=3), models),
    }


CASES: dict[str, Case] = {
    # decoding, on a transformers model (the MiniGPT run of the same stack is test_minigpt_runs_the_same_stack)
    **decoder_cases("model", lambda s: [s.model]),
    "decoding.search.greedy_search": Case(lambda s: search.greedy_search(s.model, s.ids, s.mask, max_new_tokens=3)),
    "decoding.search.beam_search": Case(
        lambda s: search.beam_search(s.model, s.ids, s.mask, num_beams=2, max_new_tokens=3)),
    "decoding.search.BeamDecoder": Case(lambda s: search.BeamDecoder(s.model, s.ids, s.mask, num_beams=2)),
    "decoding.contrastive.contrastive_search": Case(
        lambda s: contrastive.contrastive_search(s.model, s.ids, s.mask, max_new_tokens=3)),
    "decoding.diverse.diverse_beam_search": Case(lambda s: diverse.diverse_beam_search(
        s.model, s.ids, s.mask, num_beams=2, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=3)),
    "decoding.sampling.sample": Case(
        lambda s: sampling.sample(s.model, s.ids, s.mask, max_new_tokens=3, repetition_penalty=1.2),
        stop_at=lambda s: (sampling, "generate"),
        why="sample moves its inputs first (its repetition penalty reads the mask), then " + GENERATE_VALIDATES),
    "decoding.sampling.next_token_probs": Case(
        lambda s: sampling.next_token_probs(s.model, s.ids, s.mask, processors=[RepetitionPenalty(1.2)])),
    # speculative decoding: the inputs follow the target, and reach the draft on its device
    "decoding.speculative.speculative_generate": Case(
        lambda s: speculative.speculative_generate(s.model, s.ids[1:], draft=s.draft, max_new_tokens=3),
        models=both_models),
    "decoding.speculative.Scorer": Case(
        lambda s: speculative.Scorer(s.draft, None, 4).scores(s.ids[1:], 1, ()), models=lambda s: [s.draft]),
    # ensembles: the inputs follow member 0
    "ensembles.Ensemble.member_log_probs": Case(
        lambda s: ensembles.Ensemble([s.model, s.draft]).member_log_probs(s.ids, s.mask), models=both_models),
    "ensembles.Ensemble.forward": Case(
        lambda s: ensembles.Ensemble([s.model, s.draft])(input_ids=s.ids, attention_mask=s.mask), models=both_models),
    # measuring
    "measure.report": Case(
        lambda s: measure.report({"base": s.model}, s.stream, s.ids[1:], max_new_tokens=2, repeats=1, context=8),
        stop_at=lambda s: (s.model, "generate"),
        why="report times transformers' own model.generate, which syncs on the model's device before its first "
            "forward (_prepare_special_tokens): meta tensors cannot, so check what report hands to generate"),
    "measure.repeatable_decode_step": Case(lambda s: measure.repeatable_decode_step(s.model, s.ids[1:])),
    "measure.cost_per_token": Case(lambda s: measure.cost_per_token(s.mini, s.ids[:1], [2], repeats=1), the_mini),
    "measure.throughput_by_batch": Case(
        lambda s: measure.throughput_by_batch(s.mini, s.ids, [1, 2], 3, 1), the_mini,
        stop_at=lambda s: (measure, "greedy_no_sync"),
        why="the ids are moved once, outside the timed calls; then each timed run validates the token values "
            "(a host sync) on the moved tensors, and meta tensors cannot be read: check the hand-off"),
    # the performance model builds its own token ids, on the model's device
    "perf_model.decode_step_counts": Case(lambda s: perf_model.decode_step_counts(s.model, 2, 4)),
    "perf_model.prefill_counts": Case(lambda s: perf_model.prefill_counts(s.model, 2, 4)),
    # prompting: tokens built from text
    "prompting.next_token_distribution": Case(
        lambda s: prompting.next_token_distribution(s.model, s.tokenizer, ["Once upon a time", "A dog"])),
    "prompting.continuation_logprobs": Case(
        lambda s: prompting.continuation_logprobs(s.model, s.tokenizer, "Once upon a time", [" there", " a dog"])),
    "prompting.continuation_logprob": Case(
        lambda s: prompting.continuation_logprob(s.model, s.tokenizer, "Once upon a time", " there")),
    "prompting.complete": Case(
        lambda s: prompting.complete(s.model, s.tokenizer, ["Once upon a time", "A dog"], max_new_tokens=3)),
    "widgets.playground": Case(
        lambda s: widgets.playground(s.model, s.tokenizer, "Once upon a time", max_new_tokens=3),
        stop_at=lambda s: (sampling, "generate"),
        why="the playground samples through sample(), whose tokens are already moved when " + GENERATE_VALIDATES),
    # training, fine-tuning, metrics
    "metrics.heldout_loss": Case(lambda s: metrics.heldout_loss(s.model, s.stream, context=8)),
    "metrics.next_token_logprobs": Case(lambda s: metrics.next_token_logprobs(s.model, s.ids, s.mask)),
    "metrics.perplexity": Case(lambda s: metrics.perplexity(s.model, s.ids[1])),
    # bf16=False: torch.autocast knows no meta device type; the bf16 path differs only by that context
    "train.train_step": Case(lambda s: train.train_step(
        s.model, train.make_optimizer(s.model, 1e-3, 0.0), s.ids, s.ids, lr=1e-3, bf16=False)),
    "finetune.finetune": Case(
        lambda s: finetune.finetune(s.model, s.stream, finetune.finetune_config(steps=1, context=8, batch_size=2))),
    # serving many prompts on MiniGPT
    "batching.generate_batch": Case(
        lambda s: batching.generate_batch(s.mini, s.tokenizer, ["Once upon a time", "A dog"], 3), the_mini),
    "prefix_cache.build_prefix_cache": Case(lambda s: prefix_cache.build_prefix_cache(s.mini, s.ids[:1]), the_mini),
    "prefix_cache.first_token_with_prefix_cache": Case(
        lambda s: prefix_cache.first_token_with_prefix_cache(s.mini, steps.new_cache(s.mini), s.ids[:1]), the_mini),
    "prefix_cache.first_token_without_prefix_cache": Case(
        lambda s: prefix_cache.first_token_without_prefix_cache(s.mini, s.ids[:1, :2], s.ids[:1, 2:]), the_mini),
    "prefix_cache.generate_from_prefix": Case(
        lambda s: prefix_cache.generate_from_prefix(s.mini, _prefix_cache(s), s.ids[:1], 3), the_mini),
    "fastpath.fast_greedy": Case(lambda s: fastpath.fast_greedy(s.mini, s.ids[:1], max_new_tokens=3), the_mini),
    "fastpath.fast_speculative": Case(
        lambda s: fastpath.fast_speculative(s.mini, s.ids[1:], draft=s.mini, max_new_tokens=3), the_mini),
}

# Public callables that take a model but no token tensors, or that are exempt from the rule, and why.
NOT_ENTRY_POINTS: dict[str, str] = {
    "perf_model.narrow_twin": "no tokens: a model of the same code, made on the model's device",
    "perf_model.measure_op_s": "no tokens of the caller: times decode_step_counts (a case) on the narrow twin",
    "perf_model.measure_machine": "no tokens of the caller: measure_op_s, then rates measured on the model's device",
    "perf_model.prediction_table": "no tokens of the caller: decode_step_counts and prefill_counts (both cases)",
    "scale.int8_dynamic": "no tokens: converts the nn.Linear layers of a copy",
    "devices.model_device": "the rule's own helper",
    "devices.to_model_device": "the rule's own helper",
    "decoding.steps.new_cache": "no tokens: an empty cache sized from the config",
    "decoding.prepare.special_ids": "no tokens: EOS and pad ids from the generation config",
    "decoding.prepare.check_prompt": "validation: reads the tokens where they arrive, before the move (no device "
                                     "sync for host tokens)",
    "decoding.prepare.prepare": "validation, then the move: every decoder case above goes through it",
    "decoding.search.start_search": "prepare plus the fill id of ended hypotheses: the beam searches are cases",
    "models.check_token_ids": "validation: reads the tokens where they arrive, before the move",
    "models.context_window": "no tokens: a number from the config",
    "models.check_fits": "no tokens: a token count",
    "ensembles.vocab_size": "no tokens: a shape",
    "ensembles.Ensemble": "no tokens: the constructor takes models; forward and member_log_probs are cases",
    "finetune.add_lora": "no tokens: rewires layers",
    "finetune.merge_lora": "no tokens: rewires layers",
    "finetune.parameter_counts": "no tokens: counts parameters",
    "minigpt.MiniGPT.forward": "a model's own forward: like every torch module it expects its inputs on its device, "
                               "and stays free of device look-ups so torch.compile traces it cleanly; the decoding "
                               "steps move the tokens before calling it (test_minigpt_runs_the_same_stack)",
    "quantize.QuantizedEmbedding.forward": "a layer inside a model, like nn.Embedding: the caller moves the ids",
    "quantize.with_precision": "no tokens: copies the weights",
    "quantize.quantize": "no tokens: copies the weights",
    "prune.transformer_blocks": "no tokens: finds layers",
    "prune.magnitude_prune": "no tokens: copies the weights",
    "prune.weight_sparsity": "no tokens: counts zeros",
    "prune.drop_layers": "no tokens: copies the model",
    "timing.compare": "its variants are callables that bring their own tensors, not models",
    "timing.weight_bytes": "no tokens: counts bytes",
    "train.make_optimizer": "no tokens: groups parameters",
    "fastpath.lean_weights": "no tokens: reads the weights",
    "serving.serve": "takes requests as token lists, not tensors: ragged_batch builds every tensor on the paged "
                     "cache's device, which is the model's (test_ragged_batch_is_built_on_the_cache_device)",
    "serving.transformers_serve": "takes token lists and hands them to transformers' continuous batching "
                                  "manager, which places them itself",
}


@pytest.mark.parametrize("name", sorted(decoder_cases("mini", the_mini)))
def test_minigpt_runs_the_same_stack(name, setup, monkeypatch):
    """The decoding steps and loops move the tokens for the from-scratch model exactly as for transformers'."""
    case = decoder_cases("mini", the_mini)[name]
    stop_at_forward(setup.mini)
    if case.stop_at is not None:
        monkeypatch.setattr(*case.stop_at(setup), check_and_stop(f"{name} -> hand-off"))
    with pytest.raises(ReachedForward):
        case.call(setup)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inputs_reach_the_model_on_its_device(name, setup, monkeypatch):
    case = CASES[name]
    for module in case.models(setup):
        stop_at_forward(module)
    if case.stop_at is not None:
        owner, attribute = case.stop_at(setup)
        monkeypatch.setattr(owner, attribute, check_and_stop(f"{name} -> {attribute}"))
    monkeypatch.setattr(widgets, "widgets_available", lambda: False)  # the playground renders once, statically
    with pytest.raises(ReachedForward):
        case.call(setup)


def test_a_forgotten_move_fails_the_check(setup):
    """The check can fail: calling the model itself with CPU tensors trips the hook's assertion."""
    stop_at_forward(setup.model)
    with pytest.raises(AssertionError, match=r"off the model's device \(meta\).*input_ids.*cpu"):
        setup.model(input_ids=setup.ids)


@pytest.mark.parametrize("decode", [loop.generate, search.greedy_search, contrastive.contrastive_search,
                                    fast.greedy_no_sync, fast.greedy_without_cache])
def test_results_come_back_on_the_model_device_without_a_forward(decode, setup):
    """Nothing to generate: the prompt itself is returned, already on the model's device."""
    out = decode(setup.model, setup.ids, setup.mask, max_new_tokens=0).sequences
    assert out.device == META and out.shape == setup.ids.shape


def test_ragged_batch_is_built_on_the_cache_device():
    cache = paged_kv.PagedKVCache(1, 2, 4, num_blocks=4, block_size=2, device=META)
    cache.add(0)
    batch = serving.ragged_batch(cache, [(0, [5, 6, 7])])
    assert {t.device for t in vars(batch).values()} == {META}


def test_static_cache_lives_on_the_model_device(setup):
    cache = steps.new_cache(setup.mini, "static", batch=2, max_len=8)
    assert cache.keys.device == cache.values.device == META


MODEL_PARAMETERS = {"model", "target", "draft", "models", "variants"}  # a callable's first parameter
TOKEN_PARAMETERS = {"input_ids", "ids"}  # a model method's first parameter after self


def first_parameter(function: Callable, after_self: bool = False) -> str | None:
    names = list(inspect.signature(function).parameters)[int(after_self):]
    return names[0] if names else None


def callables_taking_a_model() -> set[str]:
    """Every public function or class of course_lib whose first parameter is a model (or models), and every
    public method of a course_lib nn.Module whose first parameter is token ids; as "module.name" below course_lib."""
    found = set()
    for info in pkgutil.walk_packages(course_lib.__path__, "course_lib."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        short = info.name.removeprefix("course_lib.")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) and first_parameter(obj) in MODEL_PARAMETERS:
                found.add(f"{short}.{name}")
            if inspect.isclass(obj) and first_parameter(obj.__init__, after_self=True) in MODEL_PARAMETERS:
                found.add(f"{short}.{name}")
            if inspect.isclass(obj) and issubclass(obj, nn.Module):
                for method_name, method in vars(obj).items():
                    public = method_name == "forward" or not method_name.startswith("_")
                    if public and inspect.isfunction(method) and first_parameter(method, True) in TOKEN_PARAMETERS:
                        found.add(f"{short}.{name}.{method_name}")
    return found


def test_every_public_callable_taking_a_model_is_checked_or_exempt_with_a_reason():
    found = callables_taking_a_model()
    listed = set(CASES) | set(NOT_ENTRY_POINTS)
    assert not set(CASES) & set(NOT_ENTRY_POINTS)
    assert found - listed == set(), "new entry points: add a case to CASES (or a reason to NOT_ENTRY_POINTS)"
    assert listed - found == set(), "stale names: these no longer exist or no longer take a model"
    assert all(NOT_ENTRY_POINTS.values())
