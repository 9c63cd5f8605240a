"""nbval runs the instructor sources in exercises/instructor/ (solutions included), which must pass their own
tests. The learner notebooks directly in exercises/ are built from them without outputs (tests/test_exercises.py
runs them to their stubs instead), so nbval does not collect them."""
from pathlib import Path

HERE = Path(__file__).parent


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    return True if collection_path.suffix == ".ipynb" and collection_path.parent == HERE else None
