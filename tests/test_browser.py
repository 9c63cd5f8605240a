"""The learner's view, in a real browser: JupyterLab and headless Chromium, driven the way a learner would.

The test starts its own JupyterLab on 127.0.0.1 (a free port, a token) over a temporary copy of the notebooks
(outputs cleared, so that everything checked comes from this run), with a temporary HOME and temporary Jupyter
settings, so nothing of the user's leaks in. It drives Chromium through Selenium with the system's chromedriver
(no browser download). For each notebook it opens ``/lab/tree/<file>``, does Run > Run All Cells through the
menus, waits for the kernel, and checks what a learner would see:

- no error output and no stderr output (pink) at all: none of it is benign today, so there is no allow-list;
- every widget drawn as a control (no "Loading widget...", no ``VBox(...)`` text), and changing one (a slider
  moved with the arrow keys, a dropdown set to another option) updates its output;
- every plot drawn (``img`` outputs of non-zero size);
- in a learner's copy of an exercise, ``check()`` prints its feedback, and a fresh copy runs to its end.

The kernel runs WITHOUT ``COURSE_STATIC`` (which conftest.py sets for nbval), so the real widgets show. Skipped
when chromium, chromedriver or selenium is missing; CI installs them.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import nbformat
import pytest

from course_lib.cli import kernel_encryption

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[dev]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="the browser test needs chromium and chromedriver on the PATH "
                                       "(Debian/Ubuntu: apt install chromium chromium-driver)")

REPO = Path(__file__).resolve().parent.parent
EXERCISE = "05_top_p_exercises.ipynb"
CELL_OF = "./ancestor::div[contains(concat(' ', @class, ' '), ' jp-Notebook-cell ')]"  # XPath: an element's cell
STDERR_MIME = "application/vnd.jupyter.stderr"  # JupyterLab draws stderr streams AND tracebacks with it


# --------------------------------------------------------------------------- the server and the browser

@dataclass
class Lab:
    """A running JupyterLab: its address, its token and the folder it serves."""

    url: str
    token: str
    root: Path

    def api(self, method: str, path: str):
        """Call the server's REST API; the decoded JSON answer (None for an empty one)."""
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self) -> None:
        """End every session (and its kernel), so the next notebook has the CPU to itself."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_without_outputs(source: Path, target: Path) -> None:
    notebook = nbformat.read(source, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(notebook, target)


def _lab_settings(folder: Path) -> None:
    """User settings: every cell in the page (no windowing: all outputs can be checked), no news pop-up, and
    the notebook's own kernel started without asking (a Lab that has just started may otherwise ask "Select
    Kernel" for the first notebook, before it has read the kernel list)."""
    settings = {"notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
                "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}
    for plugin, values in settings.items():
        path = folder / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values), encoding="utf-8")


def _learner_env(home: Path) -> dict[str, str]:
    """This process's environment minus the test settings (COURSE_STATIC, a matplotlib backend, a profiler log
    level that would hide the profiler's stderr) and the user's Jupyter/IPython/matplotlib folders, which all point
    into ``home`` instead."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("COURSE_STATIC", "MPLBACKEND", "KINETO_LOG_LEVEL")
           and not k.startswith(("JUPYTER", "IPYTHON", "PYTEST"))}
    folders = dict(HOME="home", JUPYTER_CONFIG_DIR="jupyter/config", JUPYTER_DATA_DIR="jupyter/data",
                   JUPYTER_RUNTIME_DIR="jupyter/runtime", JUPYTERLAB_SETTINGS_DIR="lab/settings",
                   JUPYTERLAB_WORKSPACES_DIR="lab/workspaces", IPYTHONDIR="ipython", MPLCONFIGDIR="matplotlib")
    for name, sub in folders.items():
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    _lab_settings(home / "lab/settings")
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab over copies of the notebooks under test and the learner notebook of one exercise."""
    root, home = tmp_path_factory.mktemp("course"), tmp_path_factory.mktemp("learner")
    for name in NOTEBOOKS:
        _copy_without_outputs(REPO / "notebooks" / name, root / name)
    (root / EXERCISE).write_bytes((REPO / "exercises" / EXERCISE).read_bytes())  # the learner notebook
    port, token = _free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               *[f"--KernelManager.{k}={v}" for k, v in kernel_encryption().items()]]
    if getattr(os, "geteuid", lambda: -1)() == 0:  # root (a container, CI): Jupyter refuses without this
        command.append("--allow-root")
    log_path = home / "server.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=root, env=_learner_env(home), stdout=log, stderr=subprocess.STDOUT)
    server_lab = Lab(f"http://127.0.0.1:{port}", token, root)
    try:
        _wait(lambda: server.poll() is not None or _answers(server_lab), 120, "JupyterLab to start")
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
        yield server_lab
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _answers(lab: Lab) -> bool:
    try:
        lab.api("GET", "/api/status")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium through the system's chromedriver."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def notebook_page(lab: Lab, browser) -> Iterator[Callable[[str], "Page"]]:
    """Opens a notebook in the browser; afterwards leaves the page and shuts its kernel down."""
    def open_notebook(name: str) -> Page:
        browser.get(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}")  # reset: only this notebook opens
        page = Page(browser, name)
        _wait(lambda: page.kernel_status() == "idle", 120, f"{name}: its kernel to start")
        return page

    yield open_notebook
    browser.get("about:blank")
    lab.shut_down_kernels()


# --------------------------------------------------------------------------- what the learner sees

def _wait(condition: Callable[[], object], timeout: float, what: str | Callable[[], str], interval: float = 0.5):
    """Poll ``condition`` until it returns something true; that value, or a failed test after ``timeout`` s
    that says ``what`` it waited for (a callable: asked at that moment, to describe the state)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"waited {timeout:.0f} s for {what() if callable(what) else what}")


# Every output of the notebook (widget outputs included) with its cell's index, its MIME type and its text.
_OUTPUTS_JS = """
return [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')].map(o => ({
    cell: Number(o.closest('.jp-Notebook-cell')?.dataset.windowedListIndex ?? -1),
    mime: o.dataset.mimeType || '', text: o.innerText}));
"""
_IMAGES_JS = """
return [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output img')].map(i => {
    const box = i.getBoundingClientRect();
    return {natural: i.naturalWidth * i.naturalHeight, shown: box.width * box.height};
});
"""
# The output area of the interact() box holding the control labelled arguments[0].
_WIDGET_OUTPUT_JS = """
const label = [...document.querySelectorAll('.jp-Notebook .widget-label')].find(l => l.textContent === arguments[0]);
return label.closest('.widget-vbox').querySelector('.widget-output').innerText;
"""


class Page:
    """The open notebook, read and driven through the page."""

    def __init__(self, driver, name: str):
        self.driver, self.name = driver, name

    def kernel_status(self) -> str:
        found = self.driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")
        return found[0].get_attribute("data-status") if found else ""

    def prompts(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')]"
            ".map(p => p.textContent)")

    def outputs(self) -> list[dict]:
        return self.driver.execute_script(_OUTPUTS_JS)

    def run_all(self, timeout: float) -> float:
        """Run > Run All Cells, through the menu bar; returns the seconds until every cell ran (or one failed)."""
        start = time.monotonic()
        started = lambda: any(p != "[ ]:" for p in self.prompts())  # noqa: E731
        for _ in range(3):  # in a Lab that has just started, the first menu click can land before the
            self.menu("Run", "runmenu:run-all")  # notebook's commands are ready: then click again
            deadline = time.monotonic() + 20
            while not started() and time.monotonic() < deadline:
                time.sleep(0.5)
            if started():
                break
        if not started():
            pytest.fail(f"{self.name}: Run All did not start after 3 clicks on Run > Run All Cells")
        _wait(self._run_finished, timeout, lambda: f"{self.name}: Run All to finish; kernel "
              f"{self.kernel_status()!r}, prompts {self.prompts()}", interval=1.0)
        return time.monotonic() - start

    def run_cells(self, cells: list[int], timeout: float) -> float:
        """Run ``cells`` one after the other, each selected with a click and run with Shift+Enter; returns the
        seconds until the last one ran."""
        start = time.monotonic()
        for index in cells:
            prompt = self.driver.find_element(
                By.CSS_SELECTOR, f".jp-Notebook-cell[data-windowed-list-index='{index}'] .jp-InputArea-prompt")
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", prompt)
            prompt.click()
            self.driver.switch_to.active_element.send_keys(Keys.SHIFT + Keys.ENTER)
            _wait(lambda: re.fullmatch(r"\[\d+\]:", prompt.text) and self.kernel_status() == "idle",
                  timeout, lambda: f"{self.name}: cell {index} to run; prompt {prompt.text!r}", interval=1.0)
        return time.monotonic() - start

    def _run_finished(self) -> bool:
        prompts = self.prompts()
        if any("*" in p for p in prompts) or self.kernel_status() != "idle":
            return False
        failed = any(o["mime"] == STDERR_MIME and "Traceback" in o["text"] for o in self.outputs())
        return failed or all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)

    def menu(self, title: str, command: str) -> None:
        """Open menu ``title`` of the menu bar and click the item of ``command``."""
        self.fail_if_a_dialog_covers_the_page()
        bar = self.driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
        next(item for item in bar if item.text == title).click()
        self.driver.find_element(By.CSS_SELECTOR, f".lm-Menu-item[data-command='{command}']").click()

    def fail_if_a_dialog_covers_the_page(self) -> None:
        """A modal dialog would take the next click: fail with what it says rather than with a click error."""
        for dialog in self.driver.find_elements(By.CSS_SELECTOR, "dialog.jp-Dialog"):
            pytest.fail(f"{self.name}: a JupyterLab dialog covers the page: {' '.join(dialog.text.split())!r}")

    def widget_output(self, label: str) -> str:
        """The text under the interact() controls that include the control labelled ``label``."""
        return self.driver.execute_script(_WIDGET_OUTPUT_JS, label)

    def control(self, kind: str, label: str):
        """The control (``slider`` or ``dropdown``) whose label reads ``label``."""
        for box in self.driver.find_elements(By.CSS_SELECTOR, f".jp-Notebook .widget-{kind}"):
            if box.find_element(By.CSS_SELECTOR, ".widget-label").text == label:
                return box
        raise AssertionError(f"{self.name}: no {kind} labelled {label!r}")

    def move_slider(self, label: str) -> None:
        """One step up of the slider labelled ``label``, with the right arrow key as a learner can."""
        self.control("slider", label).find_element(By.CSS_SELECTOR, ".noUi-handle").send_keys(Keys.ARROW_RIGHT)

    def choose(self, label: str, option: str) -> None:
        """Set the dropdown labelled ``label`` to ``option``."""
        Select(self.control("dropdown", label).find_element(By.TAG_NAME, "select")).select_by_visible_text(option)


def check_what_the_learner_sees(page: Page, min_images: int, widgets: bool) -> None:
    """No error or unexpected stderr, widgets drawn as controls (or none expected), plots drawn."""
    outputs = page.outputs()
    pink = [o for o in outputs if o["mime"] == STDERR_MIME]
    assert not pink, f"{page.name}: error or stderr output:\n" + "\n".join(
        f"cell {o['cell']}: {o['text'][:800]}" for o in pink)
    texts = [o["text"] for o in outputs]
    assert not any("Loading widget" in t for t in texts), f"{page.name}: a widget never rendered"
    reprs = [t[:80] for t in texts if re.match(r"(VBox|HBox|interactive|IntSlider|FloatSlider|Dropdown)\(", t)]
    assert not reprs, f"{page.name}: widgets shown as text, not controls: {reprs}"
    controls = page.driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jupyter-widgets.widget-slider, "
                                                          ".jp-Notebook .jupyter-widgets.widget-dropdown")
    assert bool(controls) == widgets, f"{page.name}: {len(controls)} widget controls drawn"
    images = page.driver.execute_script(_IMAGES_JS)
    assert len(images) >= min_images, f"{page.name}: {len(images)} plots drawn, expected at least {min_images}"
    assert all(i["natural"] > 0 and i["shown"] > 0 for i in images), f"{page.name}: an empty plot: {images}"


def _label_fits(page: Page, kind: str, label: str) -> bool:
    element = page.control(kind, label).find_element(By.CSS_SELECTOR, ".widget-label")
    return page.driver.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth", element)


# --------------------------------------------------------------------------- the notebooks

def _tour(page: Page) -> None:
    """00 draws plots only: nothing to change."""


def _top_p(page: Page) -> None:
    """05's playground: one more step of the seed slider draws a new sample (and its chart)."""
    assert "seed=0" in page.widget_output("seed")
    page.move_slider("seed")
    _wait(lambda: "seed=1" in page.widget_output("seed"), 120, "05: the playground to redraw for seed=1")


def _caching(page: Page) -> None:
    """11's KV-cache calculator: its labels are whole, and another model changes the size printed."""
    assert _label_fits(page, "dropdown", "model_name"), "11: the dropdown label 'model_name' is cut"
    page.choose("model_name", "storyteller")
    _wait(lambda: page.widget_output("model_name").startswith("storyteller:"), 60,
          "11: the KV-cache size of the storyteller")


def _optimization(page: Page) -> None:
    """12's quantization explorer: int8 instead of int4 changes the error printed."""
    assert "int4, group 32" in page.widget_output("bits")
    page.choose("bits", "8")
    _wait(lambda: "int8, group 32" in page.widget_output("bits"), 60, "12: the int8 quantization error")


@dataclass(frozen=True)
class Case:
    """How a notebook is run and what changes in its widgets. ``cells``: None for Run All through the menu;
    otherwise the cells (each named by a piece of its source) to run one by one with Shift+Enter, for a notebook
    whose Run All takes far longer than this test can (its benchmarks): the set-up they need, their plots and
    their widgets."""

    change_a_widget: Callable[[Page], None]
    widgets: bool
    timeout: float
    cells: tuple[str, ...] | None = None


NOTEBOOKS = {
    "00_setup_and_tour.ipynb": Case(_tour, widgets=False, timeout=180),
    "05_top_p.ipynb": Case(_top_p, widgets=True, timeout=400),
    "11_caching_and_parallelization.ipynb": Case(_caching, widgets=True, timeout=300, cells=(
        "# Setup: installs the course's library", "from course_lib.kv_cache import", "hf_model, tokenizer = load_model",
        "plots.kv_memory(", "KNOWN_MODELS = {")),
    "12_inference_optimization.ipynb": Case(_optimization, widgets=True, timeout=300, cells=(
        "# Setup: installs the course's library", "from course_lib.quantize import", 'model, tokenizer = load_model("storyteller"',
        "decode_time_breakdown(step", "conv = model.transformer.h[0].mlp.c_fc", "def show_quantization")),
}


def cell_indices(notebook: Path, pieces: tuple[str, ...]) -> list[int]:
    """The index of the one cell whose source holds each piece (an error names a piece that matches 0 or 2+)."""
    sources = [c.source for c in nbformat.read(notebook, as_version=4).cells]
    found = []
    for piece in pieces:
        matches = [i for i, source in enumerate(sources) if piece in source]
        assert len(matches) == 1, f"{notebook.name}: {len(matches)} cells hold {piece!r}; update the test's list"
        found.append(matches[0])
    return found


def stored_images(notebook: Path, cells: list[int] | None) -> int:
    """Plots in the stored (static) outputs of ``cells`` (None: all): the live run draws at least as many."""
    stored = nbformat.read(notebook, as_version=4).cells
    return sum("image/png" in o.get("data", {}) for i, c in enumerate(stored) if cells is None or i in cells
               for o in c.get("outputs", []))


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_a_learner_runs_the_notebook(lab, notebook_page, name):
    case = NOTEBOOKS[name]
    cells = None if case.cells is None else cell_indices(lab.root / name, case.cells)
    page = notebook_page(name)
    seconds = page.run_all(case.timeout) if cells is None else page.run_cells(cells, case.timeout)
    print(f"{name}: {'Run All' if cells is None else f'{len(cells)} cells'} took {seconds:.0f} s")
    check_what_the_learner_sees(page, stored_images(REPO / "notebooks" / name, cells), case.widgets)
    case.change_a_widget(page)


def test_a_learner_runs_a_fresh_exercise_then_checks_a_first_attempt(notebook_page):
    page = notebook_page(EXERCISE)
    page.run_all(180)
    check_what_the_learner_sees(page, 0, False)
    texts = "\n".join(o["text"] for o in page.outputs())
    for question in ("q1", "q2", "q3"):
        assert f"{question}: not started yet" in texts, f"check({question!r}) printed no feedback:\n{texts}"
    assert "not implemented yet: write top_p_filter above" in texts, texts

    # A first, wrong attempt at q3: the stub line becomes "return scores"; run it, its tests, then check("q3").
    stub = next(line for line in page.driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .cm-line")
                if "raise NotImplementedError" in line.text
                and "def apply_processors" in line.find_element(By.XPATH, CELL_OF).text)
    stub.click()
    page.driver.switch_to.active_element.send_keys(Keys.HOME, Keys.SHIFT + Keys.END)
    page.driver.switch_to.active_element.send_keys("return scores")
    for _ in range(3):  # the task cell, its tests cell, its check cell
        page.driver.switch_to.active_element.send_keys(Keys.SHIFT + Keys.ENTER)
    feedback = _wait(lambda: next((o["text"] for o in page.outputs() if o["text"].startswith("q3: 1 of 2")), None),
                     60, "check('q3') to report the attempt")
    assert "FAILED applies the processors in order" in feedback and "the result differs in" in feedback
    assert "Greatest" not in feedback, feedback
