"""The notebooks as documentation pages, with their outputs: docs/notebooks/NN_name.md and its figures.

Run (each notebook executed top to bottom in a fresh kernel, as ``jupyter nbconvert --execute`` does):

    python benchmarks/render_notebooks.py            # full runs (3000 steps): several minutes on 2 cores
    python benchmarks/render_notebooks.py --quick    # BPJAX_QUICK=1: a few hundred steps, about a minute

The notebooks in notebooks/ are stored without outputs (they are code to run); these pages are what
running them shows, stamped with the command, date, machine and JAX version, and listed under
"Notebooks" in mkdocs.yml. ``tests/test_docs.py`` checks that every notebook has its page.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "notebooks"


def render(path: Path, quick: bool) -> None:
    import nbformat
    from nbconvert import MarkdownExporter
    from nbconvert.preprocessors import ExecutePreprocessor

    notebook = nbformat.read(path, as_version=4)
    env_before = os.environ.get("BPJAX_QUICK")
    if quick:
        os.environ["BPJAX_QUICK"] = "1"  # inherited by the kernel
    else:
        os.environ.pop("BPJAX_QUICK", None)
    try:
        ExecutePreprocessor(timeout=3600, kernel_name="python3").preprocess(
            notebook, {"metadata": {"path": str(path.parent)}}
        )
    finally:
        if env_before is None:
            os.environ.pop("BPJAX_QUICK", None)
        else:
            os.environ["BPJAX_QUICK"] = env_before
    files = f"{path.stem}_files"
    body, resources = MarkdownExporter().from_notebook_node(
        notebook, resources={"output_files_dir": files, "unique_key": path.stem}
    )
    import jax

    stamp = (
        f"*Rendered by `python benchmarks/render_notebooks.py{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}{'; BPJAX_QUICK=1: shortened runs' if quick else ''}. The notebook itself: "
        f"`notebooks/{path.name}` (stored without outputs).*"
    )
    shutil.rmtree(OUT / files, ignore_errors=True)
    for name, data in resources.get("outputs", {}).items():
        target = OUT / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (OUT / f"{path.stem}.md").write_text(f"{stamp}\n\n{body.strip()}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="BPJAX_QUICK=1: shortened runs")
    p.add_argument("--only", help="comma-separated notebook names (default: all)")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    paths = sorted((ROOT / "notebooks").glob("*.ipynb"))
    if args.only:
        paths = [q for q in paths if q.stem in args.only.split(",")]
    for path in paths:
        start = time.perf_counter()
        render(path, args.quick)
        print(f"{path.stem}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
