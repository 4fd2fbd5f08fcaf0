"""The documentation: the README front page and the mkdocs site in docs/.

The site builds in strict mode (a broken link or anchor between pages fails it), the generated
configuration reference is current, the README stays a short front page that keeps its quick start, and
every registered strategy is in the README's table and has a section in docs/strategies.md.
"""

import re
import subprocess
import sys

from bpjax import config as cfg_lib
from bpjax import strategies

README_LIMIT = 10_000  # bytes


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a Markdown text, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no '## {heading}' section"
    return match.group(1)


def test_mkdocs_builds_strict(root, tmp_path):
    # A subprocess: mkdocs and its plugins may warn on import, and warnings are errors in this suite.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}{result.stdout}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_nav_lists_every_page(root):
    nav = (root / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (root / "docs").glob("*.md"))
    missing = [page for page in pages if not re.search(rf":\s*{re.escape(page)}\s*$", nav, re.MULTILINE)]
    assert not missing, f"docs pages missing from the nav in mkdocs.yml: {missing}"


def test_configuration_reference_is_current(root):
    on_disk = (root / "docs" / "configuration.md").read_text()
    assert on_disk == cfg_lib.reference_markdown(), (
        "docs/configuration.md is stale; run: bpjax config --schema > docs/configuration.md"
    )


def test_readme_is_a_short_front_page_with_the_quick_start(root):
    raw = (root / "README.md").read_bytes()
    assert len(raw) < README_LIMIT, (
        f"README.md is {len(raw)} bytes; move detail into docs/ (limit {README_LIMIT})"
    )
    quick = section(raw.decode(), "Quick start")
    commands = re.findall(r"^```bash\n(.*?)\n```$", quick, re.MULTILINE | re.DOTALL)
    assert len(commands) == 2, f"the quick start should hold two fenced commands, found {commands}"
    for command in commands:
        assert "\n" not in command.strip(), f"a quick-start command is one line: {command!r}"
        assert command.startswith("python3 -m venv .venv && "), command
    run, test = commands
    experiment = run.rsplit("bpjax run ", 1)[-1]
    assert (root / experiment).is_file(), f"the quick start runs {experiment}, which does not exist"
    assert test.endswith("pytest"), test


def test_every_strategy_is_documented(root):
    table = section((root / "README.md").read_text(), "Strategies")
    rows = set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))
    headings = re.findall(r"^#{2,3} (.*)$", (root / "docs" / "strategies.md").read_text(), re.MULTILINE)
    named = {name for heading in headings for name in re.findall(r"`([^`]+)`", heading)}
    for name in strategies.REGISTRY:
        assert name in rows, f"README.md's strategy table has no row for {name!r}"
        assert name in named, f"docs/strategies.md has no section heading naming `{name}`"


def test_experiment_results_are_measured_and_stamped(root):
    """docs/experiments.md's results come from benchmarks/experiment_results.py, with a stamp line naming
    the command, date, machine and JAX version, and a row for every experiment file."""
    text = (root / "docs" / "experiments.md").read_text()
    block = text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    stamp = re.search(
        r"Measured by `python benchmarks/experiment_results.py --write` on (\d{4}-\d\d-\d\d): .*jax (\S+),",
        block,
    )
    assert stamp, "no stamp line; run: python benchmarks/experiment_results.py --write"
    rows = set(re.findall(r"^\| `([^`]+)` \|", block, re.MULTILINE))
    files = {p.stem for p in (root / "experiments").glob("*.py") if "def get_configs" not in p.read_text()}
    assert files <= rows, (
        f"{sorted(files - rows)} have no measured row; run: python benchmarks/experiment_results.py --write"
    )


def test_every_notebook_is_rendered_in_the_docs(root):
    """docs/notebooks/NN_name.md: each notebook with its outputs (benchmarks/render_notebooks.py), stamped,
    in the site's nav."""
    nav = (root / "mkdocs.yml").read_text()
    for notebook in sorted((root / "notebooks").glob("*.ipynb")):
        page = root / "docs" / "notebooks" / f"{notebook.stem}.md"
        fix = "run: python benchmarks/render_notebooks.py"
        assert page.is_file(), f"{notebook.name} has no rendered page; {fix}"
        text = page.read_text()
        assert text.startswith("*Rendered by `python benchmarks/render_notebooks.py"), (
            f"{page.name}: no stamp; {fix}"
        )
        assert re.search(r"on \d{4}-\d\d-\d\d: .*jax \S+", text.splitlines()[0]), page.name
        assert f"notebooks/{notebook.stem}.md" in nav, f"mkdocs.yml's nav does not list {page.name}"
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (page.parent / image).is_file(), f"{page.name} shows {image}, which is missing; {fix}"
