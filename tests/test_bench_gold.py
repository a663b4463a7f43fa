"""scripts/bench_gold.py without TRL: its arguments, the clear refusal when the TRL environment
(.venv-gold, made by `make bench-gold`) is missing, and the summary, verdicts and table it prints.

The benchmark itself (minutes, TRL in its own venv) is `make bench-gold`; nothing here needs TRL.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gold.py"


@pytest.fixture(scope="module")
def bench_gold():
    return load_script("bench_gold")


def test_arguments_and_their_defaults(bench_gold) -> None:
    args = bench_gold.parser().parse_args([])
    assert (args.rounds, args.steps, args.warmup, args.batch, args.new_tokens) == (3, 3, 1, 8, 64)
    assert args.ours == ("simct", "exact", "bpm") and args.gold == ("uld", "hybrid")
    assert args.gold_python == str(ROOT / ".venv-gold" / "bin" / "python")
    assert args.out == "results/bench_gold.json"
    args = bench_gold.parser().parse_args(["--ours", "exact", "--gold", "hybrid,uld", "--rounds", "1"])
    assert (args.ours, args.gold, args.rounds) == (("exact",), ("hybrid", "uld"), 1)


@pytest.mark.parametrize("argv", [["--ours", "simct,nope"], ["--gold", "gkd"], ["--steps", "two"]])
def test_bad_arguments_exit_2(bench_gold, argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_gold.parser().parse_args(argv)
    assert exit_info.value.code == 2


def test_non_positive_counts_are_refused(bench_gold, tmp_path, capsys) -> None:
    assert bench_gold.main(["--rounds", "0", "--out", str(tmp_path / "b.json")]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_missing_trl_venv_is_refused_in_one_line(tmp_path) -> None:
    """Run as `make bench-gold` runs it, but pointed at a TRL python that does not exist."""
    missing = tmp_path / "no-venv" / "bin" / "python"
    out = tmp_path / "b.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--gold-python", str(missing), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "make bench-gold" in err[0]
    assert not out.exists()  # nothing measured, nothing written


def test_a_python_without_trl_is_refused(bench_gold) -> None:
    if importlib.util.find_spec("trl") is not None:
        pytest.skip("trl is importable here: this python would be accepted")
    why = bench_gold.check_gold_python(sys.executable)
    assert why is not None and "cannot import trl" in why and "make bench-gold" in why


def fake_runs() -> dict:
    def ours(t: float) -> dict:
        phases = dict.fromkeys(("rollout", "teacher", "student_forward", "align", "loss", "teacher_mass", "update"), t / 7)
        return {"step": t, **phases, "rewards": 0.0, "response_len": 64.0}

    return {
        "ours:simct": [{"steps": [ours(2.0), ours(3.0)], "peak_rss_mb": 900.0},
                       {"steps": [ours(2.5)], "peak_rss_mb": 950.0}],
        "gold:uld": [{"steps": [{"step": 9.0}, {"step": 6.0}], "peak_rss_mb": 2000.0},
                     {"steps": [{"step": 7.5}], "peak_rss_mb": 2100.0}],
        "gold:hybrid": [{"steps": [{"step": 6.0}, {"step": 7.0}], "peak_rss_mb": 2200.0}],
    }  # fmt: skip


def test_summary_verdicts_and_table(bench_gold) -> None:
    summary = bench_gold.summarize(fake_runs())
    assert summary["ours:simct"]["median_s"] == 2.5 and summary["ours:simct"]["min_s"] == 2.0
    assert summary["ours:simct"]["steps"] == 3 and summary["ours:simct"]["peak_rss_mb"] == 950.0
    assert summary["gold:uld"]["median_s"] == 7.5 and summary["gold:hybrid"]["median_s"] == 6.5
    assert summary["ours:simct"]["phases_median_s"]["update"] == pytest.approx(2.5 / 7)
    checks = {c["gold"]: c for c in bench_gold.verdicts(summary)}
    # the verdict is on the best steps: 2.0 / 6.0 for both
    assert checks["gold:uld"]["ratio_min"] == pytest.approx(1 / 3) and checks["gold:uld"]["met"]
    assert checks["gold:uld"]["ratio_median"] == pytest.approx(1 / 3)
    assert checks["gold:hybrid"]["ratio_median"] == pytest.approx(2.5 / 6.5) and checks["gold:hybrid"]["met"]
    summary["ours:simct"]["min_s"] = 2.1
    checks = {c["gold"]: c for c in bench_gold.verdicts(summary)}
    assert not checks["gold:uld"]["met"] and not checks["gold:hybrid"]["met"]
    text = bench_gold.table(summary, bench_gold.verdicts(summary))
    assert "| ours:simct | 2.50 | 2.10 | 3 | 950 |" in text
    assert "| simct | 0.35 (0.38; nan) not met | 0.35 (0.33; nan) not met |" in text  # columns: hybrid, uld


def test_paired_ratios_compare_within_a_round(bench_gold) -> None:
    paired = bench_gold.paired_ratios(fake_runs())
    assert paired["ours:simct|gold:uld"] == [pytest.approx(2.5 / 7.5), pytest.approx(2.5 / 7.5)]
    assert paired["ours:simct|gold:hybrid"] == [pytest.approx(2.5 / 6.5)]  # one round of hybrid
    checks = {c["gold"]: c for c in bench_gold.verdicts(bench_gold.summarize(fake_runs()), paired)}
    assert checks["gold:uld"]["ratio_per_round_median"] == pytest.approx(1 / 3)
