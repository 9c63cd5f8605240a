"""ipywidgets controls with a static fallback.

``interact(render, temperature=Slider(0.7, 0.1, 2.0, 0.1))`` shows sliders that re-run ``render`` on every
change when a Jupyter front end can draw widgets. Where it cannot (nbval, headless runs, a terminal, a static
viewer, or COURSE_STATIC=1), it calls ``render`` once with the initial values, so the stored output still
shows a real result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

STATIC_ENV_VAR = "COURSE_STATIC"


@dataclass(frozen=True)
class Slider:
    """A numeric control: initial value, range and step (ints give an IntSlider)."""

    value: float
    low: float
    high: float
    step: float = 1

    def widget(self, name: str):
        import ipywidgets as w

        is_int = all(isinstance(v, int) for v in (self.value, self.low, self.high, self.step))
        cls = w.IntSlider if is_int else w.FloatSlider
        return cls(value=self.value, min=self.low, max=self.high, step=self.step, description=name,
                   continuous_update=False, style={"description_width": "initial"})


@dataclass(frozen=True)
class Choice:
    """A drop-down control over fixed options."""

    value: Any
    options: Sequence[Any]

    def widget(self, name: str):
        import ipywidgets as w

        # "initial": the label is as wide as its text (the default width cuts "model_name" to "model_na...").
        return w.Dropdown(value=self.value, options=list(self.options), description=name,
                          style={"description_width": "initial"})


def widgets_available() -> bool:
    """True inside a live Jupyter kernel with ipywidgets installed, unless COURSE_STATIC=1."""
    if os.environ.get(STATIC_ENV_VAR, "0").lower() in ("1", "true", "yes"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def interact(render: Callable[..., None], **controls: Slider | Choice) -> None:
    """Show ``controls`` that re-run ``render(**values)``; without widgets, run it once statically."""
    initial = {name: c.value for name, c in controls.items()}
    if not widgets_available():
        render(**initial)
        return
    import ipywidgets as w
    from IPython.display import display

    boxes = {name: c.widget(name) for name, c in controls.items()}
    output = w.interactive_output(render, boxes)
    display(w.VBox([w.HBox(list(boxes.values()), layout=w.Layout(flex_flow="row wrap")), output]))


def playground(model, tokenizer, prompt: str, *, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int = 0, max_new_tokens: int = 40) -> None:
    """Sliders for the sampling controls; every setting prints a seeded sample of ``prompt``'s continuation and
    draws the first next-token distribution after the controls, with the drawn token in orange."""
    import matplotlib.pyplot as plt
    import torch

    from course_lib.data import encode_prompt
    from course_lib.decoding.sampling import next_token_probs, sample, sampling_processors
    from course_lib.devices import to_model_device
    from course_lib.plots import next_token_bars

    input_ids = to_model_device(model, torch.tensor([encode_prompt(tokenizer, prompt)]))  # (1, T): BOS first, moved once

    def render(temperature, top_k, top_p, repetition_penalty, seed, max_new_tokens):
        controls = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        ids = sample(model, input_ids, max_new_tokens=max_new_tokens, seed=seed, **controls).sequences  # (1, T + new)
        print(f"T={temperature:.2f} top_k={top_k} top_p={top_p:.2f} repetition_penalty={repetition_penalty:.2f} "
              f"seed={seed}\n")
        print(tokenizer.decode(ids[0], skip_special_tokens=True))
        probs = next_token_probs(model, input_ids, processors=sampling_processors(input_ids, **controls))[0]  # (V,)
        allowed = int((probs > 0).sum())
        next_token_bars(probs, tokenizer, highlight=int(ids[0, input_ids.shape[1]]),
                        title=f"first step: {allowed} tokens can be drawn (orange = drawn)")
        plt.show()

    interact(render, temperature=Slider(float(temperature), 0.05, 2.0, 0.05), top_k=Slider(int(top_k), 0, 200, 1),
             top_p=Slider(float(top_p), 0.05, 1.0, 0.05),
             repetition_penalty=Slider(float(repetition_penalty), 0.5, 2.0, 0.05),
             seed=Slider(int(seed), 0, 1000, 1), max_new_tokens=Slider(int(max_new_tokens), 1, 100, 1))
