"""The instructor's commands: ``exercises build`` and ``grade``; ``register_grading_commands`` adds them to any argparse CLI."""

from __future__ import annotations

import argparse
import sys
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


def _grade(args: argparse.Namespace) -> int:
    from course_lib.grading.grade import grade_folder

    try:
        if args.no_sandbox:
            print("WARNING: --no-sandbox: submissions run with your permissions, unconfined; use it only for "
                  "submissions you trust. The CSV and every feedback file say so.", file=sys.stderr, flush=True)
        rows = grade_folder(args.exercise, args.submissions, args.results, timeout=args.timeout,
                            jobs=args.jobs, use_sandbox=not args.no_sandbox, memory_mb=args.memory_mb)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    students = len({row["student"] for row in rows})
    print(f"graded {students} submissions: {args.results / 'grades.csv'} and {args.results / 'feedback'}/")
    return 0


def register_grading_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``exercises build`` and ``grade`` to a CLI's subcommands."""
    exercises = subparsers.add_parser("exercises", help="exercise notebooks for learners")
    actions = exercises.add_subparsers(dest="exercises_command", required=True)
    build = actions.add_parser("build", help="check the solutions, then write the learner notebooks")
    build.add_argument("source_dir", nargs="?", type=Path, default=Path("exercises/instructor"),
                       help="folder of the instructor sources: solutions and hidden tests (default: "
                            "exercises/instructor; it may lie outside the repository)")
    build.add_argument("student_dir", nargs="?", type=Path, default=Path("exercises"),
                       help="where the learner notebooks go (default: exercises)")
    build.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per source notebook")
    build.add_argument("--jobs", type=int, default=1, help="notebooks to run at a time (default: 1)")
    build.add_argument("--check", action="store_true",
                       help="run nothing; exit 1 when a learner notebook differs from what build would write")
    build.set_defaults(func=_build)

    grade = subparsers.add_parser("grade", help="grade a folder of submitted exercise notebooks")
    grade.add_argument("submissions", type=Path, help="folder of submitted notebooks, one <student>.ipynb each")
    grade.add_argument("results", nargs="?", type=Path, default=Path("grading-results"),
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
    grade.set_defaults(func=_grade)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m course_lib.grading``; the course CLI calls ``args.func(args)`` the same way."""
    parser = argparse.ArgumentParser(prog="python -m course_lib.grading", description=__doc__)
    register_grading_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
