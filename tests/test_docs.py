"""The README's figures that code can check: the line counts of the walk through the code."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILES = ("vit.py", "llm.py", "shortcuts.py", "fusion.py", "model.py")
LIMIT = 1000                                                    # DESIGN.md, section 2


def lines_of(name):
    """Lines of Python, not counting blank ones."""
    with open(os.path.join(ROOT, name)) as f:
        return sum(1 for line in f if line.strip())


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_model_files_stay_within_the_limit_and_the_readme_quotes_them():
    counts = {name: lines_of(name) for name in MODEL_FILES}
    assert sum(counts.values()) <= LIMIT, counts
    quoted = re.search(r"\| \*\*model files\*\* \| \*\*(\d+)\*\* \|", readme())
    assert quoted and int(quoted.group(1)) == sum(counts.values())


def test_every_line_count_in_the_walk_through_is_current():
    rows = re.findall(r"^\| `(\w+\.py)` \| (\d+) \|", readme(), flags=re.M)
    assert {name for name, _ in rows} >= set(MODEL_FILES)
    for name, quoted in rows:
        assert int(quoted) == lines_of(name), f"README quotes {quoted} lines for {name}, it has {lines_of(name)}"
