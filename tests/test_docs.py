"""The README and docs/ cannot drift: the README's length, the figures it quotes (each found in a
doc its section cites), its links to docs/ (and the docs' links to each other), the walk-through's
files and line counts against the tree."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
MODEL_FILES = ("vit.py", "llm.py", "shortcuts.py", "fusion.py", "model.py")
LIMIT = 1000                                                    # DESIGN.md, section 2
README_LINES = 400
# A figure: a decimal number that is not part of a name or version (LLaVA-1.5, Qwen2/2.5, ids).
FIGURE = re.compile(r"(?<![\w./-])\d+\.\d+")
NOT_FIGURES = re.compile(r"(Python|torch|arXiv|--[\w.]+) $")   # a version, a paper id, an option's value
LINK = re.compile(r"\]\(((?:docs/)?[\w./-]+\.(?:md|png))\)")


def lines_of(name):
    """Lines of Python, not counting blank ones."""
    with open(os.path.join(ROOT, name)) as f:
        return sum(1 for line in f if line.strip())


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def sections(text):
    """(heading, body) of each `## ` section, its `###` subsections included."""
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    return [("(top)", parts[0])] + list(zip(parts[1::2], parts[2::2]))


def figures(text):
    return {m.group(0) for m in FIGURE.finditer(text) if not NOT_FIGURES.search(text[max(0, m.start() - 30):m.start()])}


def project_files():
    """Every Python file a reader is pointed to: the root's and its packages' (not tests/)."""
    names = [n for n in os.listdir(ROOT) if n.endswith(".py")]
    for folder in os.listdir(ROOT):
        if folder != "tests" and os.path.isfile(os.path.join(ROOT, folder, "__init__.py")):
            names += [f"{folder}/{n}" for n in os.listdir(os.path.join(ROOT, folder))
                      if n.endswith(".py") and n != "__init__.py"]
    return set(names)


def test_the_readme_teaches_in_at_most_400_lines():
    assert len(readme().splitlines()) <= README_LINES


def test_every_figure_the_readme_quotes_is_in_a_doc_its_section_cites():
    for heading, body in sections(readme()):
        quoted = figures(body)
        if not quoted:
            continue
        cited = [link for link in LINK.findall(body) if link.startswith("docs/") and link.endswith(".md")]
        assert cited, f"README section {heading!r} quotes {sorted(quoted)[:5]} ... and cites no doc"
        text = "".join(open(os.path.join(ROOT, link)).read() for link in cited)
        missing = sorted(f for f in quoted if f not in text)
        assert not missing, f"README section {heading!r} quotes {missing}, found in none of {cited}"


def test_every_link_to_docs_resolves():
    links = [link for link in LINK.findall(readme()) if link.startswith("docs/")]
    assert links
    for link in links:
        assert os.path.isfile(os.path.join(ROOT, link)), f"README links {link}, which does not exist"
    for name in os.listdir(DOCS):
        if name.endswith(".md"):
            for link in LINK.findall(open(os.path.join(DOCS, name)).read()):
                assert os.path.isfile(os.path.join(DOCS, link)), f"docs/{name} links {link}, which does not exist"


def test_every_doc_says_the_command_machine_and_date_that_made_it():
    for name in sorted(os.listdir(DOCS)):
        if name.endswith(".md"):
            head = "\n".join(open(os.path.join(DOCS, name)).read().splitlines()[:6])
            assert re.search(r"Command|Written by", head), f"docs/{name} does not start with its command"
            assert re.search(r"CPU|GPU|machine", head), f"docs/{name} does not name its machine"
            assert re.search(r"20\d\d-\d\d-\d\d", head) or "Written by" in head, f"docs/{name} has no date"


def test_model_files_stay_within_the_limit_and_the_readme_quotes_them():
    counts = {name: lines_of(name) for name in MODEL_FILES}
    assert sum(counts.values()) <= LIMIT, counts
    quoted = re.search(r"\| \*\*model files\*\* \| \*\*(\d+)\*\* \|", readme())
    assert quoted and int(quoted.group(1)) == sum(counts.values())


def test_the_walk_through_lists_every_file_with_its_current_line_count():
    rows = re.findall(r"^\| `([\w/]+\.py)` \| (\d+) \|", readme(), flags=re.M)
    assert {name for name, _ in rows} == project_files(), "the walk-through and the tree differ"
    for name, quoted in rows:
        assert int(quoted) == lines_of(name), f"README quotes {quoted} lines for {name}, it has {lines_of(name)}"


def test_the_root_holds_at_most_ten_python_files():
    assert len([n for n in os.listdir(ROOT) if n.endswith(".py")]) <= 10
