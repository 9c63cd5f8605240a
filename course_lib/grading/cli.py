"""The grading commands: the instructor's ``exercises build`` and ``grade`` (``grade --gradescope`` writes an
autograder bundle), the learner's ``exercises validate``; ``register_grading_commands`` adds them to an argparse CLI."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path


def _build(args: argparse.Namespace) -> int:
    from course_lib.grading.build import build, out_of_date

    try:
        if args.check:
            stale = out_of_date(args.source_dir, args.student_dir)
            for path in stale:
                print(f"out of date: {path}")
            print(f"{len(stale)} learner notebook(s) out of date in {args.student_dir}"
                  + (": run `course exercises build`" if stale else ""))
            return 1 if stale else 0
        build(args.source_dir, args.student_dir, timeout=args.timeout, jobs=args.jobs)
    except (ValueError, FileNotFoundError) as exc:  # ExerciseError and MarkerError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"learner notebooks written to {args.student_dir}")
    return 0


def _gradescope(args: argparse.Namespace) -> int:
    from course_lib.grading.export import default_install_spec, gradescope_bundle

    try:
        spec = args.install_spec or default_install_spec()
        gradescope_bundle(args.exercise, args.gradescope, spec, timeout=args.timeout, memory_mb=args.memory_mb,
                          use_sandbox=not args.no_sandbox)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Gradescope autograder bundle written to {args.gradescope} (its setup.sh installs {spec}); upload it "
          "on the assignment's Configure Autograder page and try it with a test submission")
    return 0


def _grade(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from course_lib.grading.grade import grade_folder

    if (args.submissions is None) == (args.gradescope is None):
        parser.error("give either a folder of submissions to grade or --gradescope BUNDLE.zip to write an "
                     "autograder bundle (one of the two)")
    if args.install_spec is not None and args.gradescope is None:
        parser.error("--install-spec goes with --gradescope")
    if args.no_sandbox:
        print("WARNING: --no-sandbox: submissions run with your permissions, unconfined; use it only for "
              "submissions you trust. " + ("On Gradescope a submission could read the exercise's solutions and "
                                           "hidden tests." if args.gradescope else
                                           "The CSV and every feedback file say so."), file=sys.stderr, flush=True)
    if args.gradescope is not None:
        return _gradescope(args)
    results = args.results or Path("grading-results")
    try:
        rows = grade_folder(args.exercise, args.submissions, results, timeout=args.timeout,
                            jobs=args.jobs, use_sandbox=not args.no_sandbox, memory_mb=args.memory_mb)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    students = len({row["student"] for row in rows})
    print(f"graded {students} submissions: {results / 'grades.csv'} and {results / 'feedback'}/")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from course_lib.grading.validate import validate

    return validate(args.notebook, timeout=args.timeout)


def register_grading_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``exercises build``, ``exercises validate`` and ``grade`` to a CLI's subcommands."""
    exercises = subparsers.add_parser("exercises", help="exercise notebooks for learners")
    actions = exercises.add_subparsers(dest="exercises_command", required=True)
    build = actions.add_parser("build", help="check the solutions, then write the learner notebooks")
    build.add_argument("source_dir", nargs="?", type=Path, default=Path("exercises/instructor"),
                       help="folder of the instructor sources: solutions and hidden tests (default: "
                            "exercises/instructor; it may lie outside the repository)")
    build.add_argument("student_dir", nargs="?", type=Path, default=Path("exercises"),
                       help="where the learner notebooks go (default: exercises)")
    build.add_argument("--timeout", type=float, default=600.0,
                       help="seconds allowed per source notebook, trivial stand-ins included (default: 600)")
    build.add_argument("--jobs", type=int, default=1, help="notebooks to run at a time (default: 1)")
    build.add_argument("--check", action="store_true",
                       help="run nothing; exit 1 when a learner notebook differs from what build would write")
    build.set_defaults(func=_build)
    validate = actions.add_parser("validate", help="before handing in: run the saved notebook from the top in a "
                                                   "fresh process, as the grader will, with its visible tests")
    validate.add_argument("notebook", type=Path, help="the saved exercise notebook, e.g. 05_top_p_exercises.ipynb")
    validate.add_argument("--timeout", type=float, default=60.0,
                          help="seconds allowed for the whole run (default: 60, the grader's default)")
    validate.set_defaults(func=_validate)

    grade = subparsers.add_parser("grade", help="grade a folder of submitted exercise notebooks, or write a "
                                                "Gradescope autograder bundle (--gradescope)")
    grade.add_argument("submissions", nargs="?", type=Path,
                       help="folder of submitted notebooks, one <student>.ipynb each (not with --gradescope)")
    grade.add_argument("results", nargs="?", type=Path,
                       help="where grades.csv and feedback/<student>.txt go (default: grading-results)")
    grade.add_argument("--exercise", type=Path, required=True,
                       help="the exercise's instructor source, e.g. exercises/instructor/05_top_p_exercises.ipynb "
                            "(it may lie outside the repository)")
    grade.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per submission (default: 60)")
    grade.add_argument("--jobs", type=int, default=1, help="submissions to run at a time (default: 1)")
    grade.add_argument("--memory-mb", type=int, default=4096,
                       help="address space allowed per submission, in MB (default: 4096)")
    grade.add_argument("--no-sandbox", action="store_true",
                       help="run submissions without bubblewrap (only for submissions you trust)")
    grade.add_argument("--gradescope", type=Path, metavar="BUNDLE.zip",
                       help="grade nothing here: write a Gradescope autograder bundle for --exercise (setup.sh, "
                            "run_autograder and the source) that grades each submission as this command does")
    grade.add_argument("--install-spec", metavar="SPEC",
                       help="what the bundle's setup.sh pip-installs (default: git+ the course's repository URL)")
    grade.set_defaults(func=partial(_grade, grade))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m course_lib.grading``; the course CLI calls ``args.func(args)`` the same way."""
    parser = argparse.ArgumentParser(prog="python -m course_lib.grading", description=__doc__)
    register_grading_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
