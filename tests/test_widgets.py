"""The widgets' static side (COURSE_STATIC=1, set by conftest.py): what the playground draws, and the controls."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot: draw off-screen, whatever the machine has

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from course_lib.data import encode_prompt  # noqa: E402
from course_lib.decoding.sampling import sample  # noqa: E402
from course_lib.plots import token_label  # noqa: E402
from course_lib.widgets import Choice, Slider, playground, widgets_available  # noqa: E402

PROMPT = "She liked to eat"


@pytest.fixture
def shown(monkeypatch):
    """The figures the code under test shows, one per plt.show()."""
    figures = []
    monkeypatch.setattr(plt, "show", lambda: figures.append(plt.gcf()))
    yield figures
    plt.close("all")


@pytest.mark.parametrize("settings", [dict(temperature=2.0, top_p=1.0, seed=3),  # a flat distribution
                                      dict(temperature=1.0, top_p=0.9, seed=0),
                                      dict(temperature=1.0, top_p=0.1, seed=0)],  # one or two tokens left
                         ids=["flat", "top_p 0.9", "top_p 0.1"])
def test_playground_chart_shows_the_drawn_token_and_only_possible_ones(storyteller, shown, settings):
    assert not widgets_available(), "this test checks the static drawing (COURSE_STATIC=1)"
    model, tokenizer = storyteller
    playground(model, tokenizer, PROMPT, max_new_tokens=2, **settings)
    ids = torch.tensor([encode_prompt(tokenizer, PROMPT)])  # (1, T): BOS first, as the playground encodes it
    drawn = int(sample(model, ids, max_new_tokens=2, **settings).sequences[0, ids.shape[1]])
    (figure,) = shown
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    orange = [label for label, bar in zip(labels, ax.patches) if bar.get_facecolor() == to_rgba("tab:orange")]
    assert len(orange) == 1 and orange[0].startswith(token_label(tokenizer, drawn)), (orange, labels)
    assert all(bar.get_height() > 0 for bar in ax.patches), "a bar for a token that cannot be drawn"


def test_controls_show_their_whole_name():
    pytest.importorskip("ipywidgets")
    for control in (Choice("Llama-2-7B", ["storyteller", "Llama-2-7B"]), Slider(1, 1, 64, 1)):
        assert control.widget("model_name").style.description_width == "initial", type(control).__name__
