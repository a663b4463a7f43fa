"""The notebooks run top to bottom from notebooks/ and are committed without outputs.

analysis.ipynb gets an empty LIGHTNING_OPD_RUNS, so it trains its own two tiny runs (exact,
simct); TMPDIR points the kernel's temporary files (those runs) at pytest's tmp_path, so
nothing is written into the repository.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

from lightning_opd.align import ALIGNERS

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("analysis.ipynb", "alignment_explorer.ipynb")
ROW_LINE = re.compile(r"^(\S+) +rows=(\d+) +spans=(\d+) +supervised=(\d+)/(\d+) student tokens coverage=([\d.]+)$",
                      re.MULTILINE)  # fmt: skip


def execute(name: str, tmp_path: Path, monkeypatch) -> nbformat.NotebookNode:
    """Run the notebook in a python3 kernel with cwd = notebooks/; return it with its outputs."""
    from nbclient import NotebookClient

    runs = tmp_path / "runs"
    runs.mkdir()
    monkeypatch.setenv("LIGHTNING_OPD_RUNS", str(runs))  # empty: no finished run
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's tempfile.mkdtemp lands here
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # first, which Python the kernel runs: the kernelspec's `python` is replaced by sys.executable
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first cell that fails
    assert Path(stream_text(nb.cells[0]).strip()).resolve() == Path(sys.executable).resolve()
    for cell in nb.cells:
        assert all(out.output_type != "error" for out in cell.get("outputs", [])), cell.source
    return nb


def stream_text(cell) -> str:
    return "".join(
        out.text
        for out in cell.get("outputs", [])
        if out.output_type == "stream" and out.name == "stdout"
    )


def data(nb, mime: str) -> list[str]:
    return [
        out.data[mime]
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if mime in out.get("data", {})
    ]


def test_analysis_notebook_trains_tiny_runs_and_shows_table_and_plots(tmp_path, monkeypatch):
    nb = execute("analysis.ipynb", tmp_path, monkeypatch)
    stdout = "".join(stream_text(cell) for cell in nb.cells)
    assert "trained two tiny demonstration runs" in stdout
    assert "2 finished runs" in stdout
    tables = [t for t in data(nb, "text/markdown") if t.startswith("| variant |")]
    assert len(tables) == 1
    assert "| `tiny/exact` |" in tables[0] and "| `tiny/simct` |" in tables[0]
    assert len(data(nb, "image/png")) == 2  # the learning curves and the scatter
    # the tiny runs went to the kernel's TMPDIR, not into the repository
    assert len(list(tmp_path.glob("lightning_opd_notebook_*/runs/*/summary.json"))) == 2


def test_alignment_explorer_shows_segments_and_rows_of_every_aligner(tmp_path, monkeypatch):
    nb = execute("alignment_explorer.ipynb", tmp_path, monkeypatch)
    html = "".join(data(nb, "text/html"))
    assert html.count('<span class="tok"') > 20  # every token of both sides, as a coloured box
    assert "<details><summary><b>simct</b>" in html  # the rows of each aligner, with their texts
    # one line per registered aligner (every one builds its rows without logits):
    # (name, rows, spans, supervised, student tokens, coverage)
    lines = {m[0]: m for m in ROW_LINE.findall("".join(stream_text(cell) for cell in nb.cells))}
    assert set(lines) == set(ALIGNERS)
    coverage = {name: float(m[5]) for name, m in lines.items()}
    # qwen2.5 splits digits, gpt2 does not: there are spans, which simct supervises and exact drops
    assert coverage["simct"] > coverage["exact"]
    assert lines["exact"][2] == "0"  # exact keeps shared tokens only: no spans


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_have_no_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
