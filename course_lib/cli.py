"""The `course` command: doctor | lab | execute | bench | train | exercises build | grade | notebooks sync-setup."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from course_lib.bench import SECTIONS
from course_lib.colab import register_notebook_commands
from course_lib.grading.cli import register_grading_commands

NOTEBOOK_DIR = Path("notebooks")


def _version(package: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version({"course_lib": "accelerated-generation"}.get(package, package))
    except PackageNotFoundError:
        return "unknown"


def doctor(args: argparse.Namespace) -> int:
    """Print the environment; exit 1 with advice when something the course needs is missing."""
    problems: list[str] = []
    print(f"python        {platform.python_version()} ({sys.executable})")
    if sys.version_info < (3, 10):
        problems.append("Python >= 3.10 is needed: install a newer Python")
    for package, need in [("torch", "2.4"), ("transformers", "5.0"), ("tokenizers", None), ("safetensors", None),
                          ("accelerate", None), ("matplotlib", None), ("ipywidgets", None), ("nbval", None),
                          ("jupyterlab", None)]:
        found = _version(package)
        print(f"{package:<13} {found or 'MISSING'}")
        if found is None:
            optional = package in ("nbval", "jupyterlab")
            advice = 'pip install -e ".[dev]"' if optional else 'pip install -e .'
            problems.append(f"{package} is missing: {advice}")
        elif need and found != "unknown" and tuple(map(int, found.split(".")[:2])) < tuple(map(int, need.split("."))):
            problems.append(f"{package} {found} is too old: the course needs >= {need}")
    if _version("torch") and _version("transformers"):
        problems += _check_models()
    from course_lib.models import _hub_reachable

    print(f"hub           {'reachable' if _hub_reachable() else 'NOT reachable (offline): bundled models only'}")
    if sys.platform == "linux":  # instructors only: learners never need the grading sandbox
        from course_lib.grading.sandbox import bwrap_problem

        sandbox_problem = bwrap_problem()
        print(f"grading       {'sandbox OK (bubblewrap)' if not sandbox_problem else 'NO SANDBOX: ' + sandbox_problem}")
    if problems:
        print("\nProblems:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nAll good: run `course lab` to open the course.")
    return 0


def _check_models() -> list[str]:
    import torch

    from course_lib.devices import describe_environment
    from course_lib.models import BUNDLED_MODELS, load_model

    print(f"environment   {describe_environment()}")
    print(f"threads       {torch.get_num_threads()}")
    problems = []
    for name in BUNDLED_MODELS:
        try:
            start = time.perf_counter()
            model, _ = load_model(name, device="cpu")
            seconds = time.perf_counter() - start
            params = sum(p.numel() for p in model.parameters())
            print(f"model         {name}: {type(model).__name__}, {params / 1e6:.2f} M params, loaded in {seconds:.2f} s")
        except Exception as e:  # report every broken model, not only the first
            problems.append(f"bundled model {name!r} does not load ({type(e).__name__}: {e}); reinstall the package")
    return problems


def kernel_encryption() -> dict[str, str]:
    """KernelManager settings that encrypt the traffic with each kernel (CurveZMQ keys the manager provisions)
    where jupyter_client and pyzmq can; ipykernel then no longer warns at every start that the "Kernel is
    running over TCP without encryption". Empty where they cannot (older jupyter_client: no warning either)."""
    import zmq
    from jupyter_client import KernelManager

    if "transport_encryption" in KernelManager.class_trait_names() and zmq.has("curve"):
        return {"transport_encryption": "auto"}
    return {}


def lab(args: argparse.Namespace) -> int:
    """Open the notebooks in JupyterLab."""
    settings = [f"--KernelManager.{name}={value}" for name, value in kernel_encryption().items()]
    return subprocess.call([sys.executable, "-m", "jupyter", "lab", *settings, str(args.folder)])


def execute(args: argparse.Namespace) -> int:
    """Run every notebook headless (static widgets), in place or into --out."""
    import nbformat
    from nbclient import NotebookClient
    from traitlets.config import Config

    os.environ["COURSE_STATIC"] = "1"  # no front end draws widgets here: store the static result
    config = Config({"KernelManager": kernel_encryption()})
    paths = args.notebooks or sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        print(f"no notebooks found in {NOTEBOOK_DIR.resolve()}; run from the course checkout or pass paths")
        return 1
    failed = 0
    for path in map(Path, paths):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        try:
            NotebookClient(nb, timeout=args.timeout, kernel_name="python3", config=config,
                           resources={"metadata": {"path": str(path.parent)}}).execute()
            status = "ok"
        except Exception as e:  # one broken notebook should not hide the state of the others
            status, failed = f"FAILED: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}", failed + 1
        target = path if args.inplace else Path(args.out) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        print(f"{path.name:<45} {time.perf_counter() - start:6.1f} s  {status}")
    return 1 if failed else 0


def bench(args: argparse.Namespace) -> int:
    """The benchmark suite (course_lib.bench): one markdown report on stdout, a progress bar on stderr."""
    from dataclasses import replace

    from transformers.utils import logging as transformers_logging

    from course_lib.bench import QUICK, Settings, run_suite
    from course_lib.models import ContextLengthError

    # generate() drops an all-ones attention mask, and its GPT-2 then warns that the input "may be padded" when a
    # token is the pad id (also BOS and EOS here): nothing is padded, and the suite checks every variant's tokens
    transformers_logging.set_verbosity_error()
    settings = QUICK if args.quick else Settings()
    overrides = {k: v for k, v in dict(new_tokens=args.new_tokens, repeats=args.repeats).items() if v is not None}
    try:
        print(run_suite(replace(settings, **overrides), args.device, args.sections))
    except ContextLengthError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def train(args: argparse.Namespace) -> int:
    from course_lib.train import main as train_main

    train_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="course", description="Accelerated Generation: the course's command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check the environment and the bundled models").set_defaults(func=doctor)
    p = sub.add_parser("lab", help="open the notebooks in JupyterLab")
    p.add_argument("folder", nargs="?", default=NOTEBOOK_DIR)
    p.set_defaults(func=lab)
    p = sub.add_parser("execute", help="run every notebook headless")
    p.add_argument("notebooks", nargs="*", help="notebooks to run (default: notebooks/NN_*.ipynb)")
    p.add_argument("--inplace", action="store_true", help="store the outputs in the notebooks themselves")
    p.add_argument("--out", default="executed", help="folder for executed copies (default: executed/)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    p.set_defaults(func=execute)
    p = sub.add_parser("bench", help="the benchmark suite: KV cache, fast path, batching, serving, speculative, quantized")
    p.add_argument("--quick", action="store_true", help="fewer tokens, repeats and requests (about a minute)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, metavar="SECTION",
                   help=f"sections to run (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--device", default=None)
    p.add_argument("--new-tokens", type=int, help="new tokens per timed generation (default 240, --quick 64)")
    p.add_argument("--repeats", type=int, help="timed runs per variant (default 5, --quick 2)")
    p.set_defaults(func=bench)
    # train's own parser (course_lib.train.main) reads every argument after "train", -h included; main() hands
    # them over (an argparse.REMAINDER positional would refuse a first argument that starts with "--").
    p = sub.add_parser("train", help="train the bundled tokenizer/models (course train -h for its options)",
                       add_help=False)
    p.set_defaults(func=train, forwards_rest=True)
    register_grading_commands(sub)  # exercises build | grade
    register_notebook_commands(sub)  # notebooks sync-setup
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "forwards_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
