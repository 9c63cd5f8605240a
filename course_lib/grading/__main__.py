"""``python -m course_lib.grading exercises build | grade`` (the same commands as ``course ...``)."""

import sys

from course_lib.grading.cli import main

sys.exit(main())
