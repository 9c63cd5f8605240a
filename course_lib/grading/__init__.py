"""Graded exercises: ``check`` and ``test`` for the learner's notebook, build and grade for the instructor.

In an exercise notebook::

    from course_lib.grading import check, needs_your_code, test

The instructor's side (``build``, ``grade_folder``) is imported lazily by the command line.
"""

from course_lib.grading.checks import check, needs_your_code, test

__all__ = ["check", "needs_your_code", "test"]
