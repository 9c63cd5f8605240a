"""nbval runs the exercise SOURCE notebooks (solutions included). The student versions that
`python -m course_lib.grading exercises build` writes to exercises/student/ raise NotImplementedError by
design, so they are never collected."""

collect_ignore_glob = ["student/*"]
