"""Per-step divergence profiles: `sod.record` (d_k recorded with SOD off, weights 1) and the
report's profile.png (`lightning_opd.cli.report.step_profile`, `plot_profile`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lightning_opd.cli import main
from lightning_opd.cli.report import find_runs, load_step_records, plot_profile, step_profile
from lightning_opd.train import train
from tests.test_train import tiny_cfg


def records_of(summary: dict) -> list[dict]:
    return load_step_records(summary["run_dir"])


def first_loss(summary: dict) -> float:
    rows = csv.DictReader((Path(summary["run_dir"]) / "metrics.csv").open())
    return next(float(r["train/loss"]) for r in rows if r.get("train/loss"))


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory) -> dict[str, dict]:
    """One tiny step of chain_tool_opd: SOD off with `sod.record` (the config's), SOD off without
    it, and SOD on; same seed, so the same first rollout."""
    out, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    variants = {"record": [], "plain": ["sod.record=false"], "sod": ["sod.enabled=true"]}
    return {name: train(tiny_cfg(out, cache, f"run.name={name}", "trainer.max_steps=1", "rollout.max_new_tokens=24",
                                 "trainer.val_every_n_steps=0", *extra, experiment="chain_tool_opd"))  # fmt: skip
            for name, extra in variants.items()}


def test_record_only_keeps_the_weights_at_one_and_records_what_sod_computes(chain_runs):
    record, sod = records_of(chain_runs["record"]), records_of(chain_runs["sod"])
    assert record and all(r["step"] == 0 and len(r["d"]) == len(r["w"]) >= 1 for r in record)
    assert all(w == 1.0 for r in record for w in r["w"])  # plain OPD: every step weighted 1
    # the same rollout with SOD on: the same d_k, trajectory by trajectory
    assert [r["sequence"] for r in record] == [r["sequence"] for r in sod]
    for a, b in zip(record, sod, strict=True):
        assert a["d"] == pytest.approx(b["d"], rel=1e-5, abs=1e-6)
    # nothing recorded without the option, and the option leaves the loss as it was
    assert records_of(chain_runs["plain"]) == []
    assert first_loss(chain_runs["record"]) == first_loss(chain_runs["plain"])
    rows = [r for r in csv.DictReader((Path(chain_runs["record"]["run_dir"]) / "metrics.csv").open()) if r["train/loss"]]
    assert float(rows[0]["train/sod/w_mean"]) == 1.0 and float(rows[0]["train/sod/d_mean"]) >= 0


def synthetic_run(root: Path, variant: str, seed: int, profiles: dict[int, list[float]]) -> Path:
    """A finished run directory whose step records have, at training step s, two trajectories
    with divergences profiles[s] and one with only its first two steps."""
    run = root / variant / f"seed{seed}"
    run.mkdir(parents=True)
    (run / "ablation.json").write_text(json.dumps({"knob": "sod", "variant": variant, "seed": seed}))
    (run / "summary.json").write_text(json.dumps({"student_accuracy_before": 0.1, "student_accuracy_after": 0.2,
                                                  "accuracy_history": [[0, 0.1], [10, 0.2]]}))  # fmt: skip
    lines = []
    for step, d in profiles.items():
        for seq in range(2):
            lines.append({"step": step, "sequence": seq, "d": d, "w": [1.0] * len(d)})
        lines.append({"step": step, "sequence": 2, "d": d[:2], "w": [1.0, 1.0]})
    (run / "sod_steps.rank0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_step_profile_means_per_index_at_start_and_end(tmp_path):
    profiles = {s: [1.0 + s, 2.0 + s, 3.0 + s] for s in range(20)}  # 20 steps: windows of 2
    run = synthetic_run(tmp_path, "off", 0, profiles)
    prof = step_profile(load_step_records(run))
    ks, d, n = prof["start"]
    assert ks == [1, 2, 3] and n == [6, 6, 4]
    assert d == pytest.approx([1.5, 2.5, 3.5])  # steps 0 and 1
    ks, d, n = prof["end"]
    assert d == pytest.approx([19.5, 20.5, 21.5])  # steps 18 and 19
    # an index that too few trajectories reach is left out
    assert step_profile(load_step_records(run), min_share=0.9)["start"][0] == [1, 2]
    assert step_profile([]) == {}


def test_plot_profile_and_report_write_profile_png(tmp_path, capsys):
    synthetic_run(tmp_path / "runs", "off", 0, {s: [1.0, 2.0, 3.0] for s in range(5)})
    synthetic_run(tmp_path / "runs", "on", 0, {s: [1.0, 1.5, 1.2] for s in range(5)})
    runs = find_runs([tmp_path / "runs"])
    path = plot_profile(runs, tmp_path / "profile.png", title="synthetic")
    assert path == tmp_path / "profile.png" and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "profile.png").is_file() and "profile.png" in capsys.readouterr().out
    # runs without records: no profile, and none left over from before
    for record in (tmp_path / "runs").rglob("sod_steps.rank0.jsonl"):
        record.unlink()
    assert plot_profile(find_runs([tmp_path / "runs"]), tmp_path / "profile.png") is None
    assert not (tmp_path / "profile.png").exists()
