"""pytest set-up shared by unit tests and nbval: notebooks run with static (non-widget) output."""
import os

# Widgets cannot render in a headless kernel: course_lib.widgets draws the static result instead, which is
# what the stored notebook outputs hold, so nbval compares like with like.
os.environ.setdefault("COURSE_STATIC", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
