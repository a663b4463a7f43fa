"""The ablation runner and the report: plan, skip/resume, tables checked against the runs' summaries."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lightning_opd.cli import main
from lightning_opd.cli.ablate import (
    ABLATION_DIR,
    ablate,
    is_baseline,
    overrides_hash,
    overrides_key,
    parse_seeds,
    plan,
    run_config,
)
from lightning_opd.cli.report import find_runs, markdown_table, mean_curve, mean_sd, summarise
from lightning_opd.config import ConfigError, load, save
from tests.test_train import ROOT, TINY

EXPERIMENTS = ROOT / "configs" / "experiment"
# knob -> the experiment its overlays are meant for
KNOB_EXPERIMENT = {"sod": "arith_tool_opd", "span_logit": "simct"}


def resolved(*paths: Path) -> dict:
    return OmegaConf.to_container(load(*paths), resolve=True)


@pytest.mark.parametrize("overlay", sorted(ABLATION_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_overlay_changes_the_config_unless_marked_as_the_baseline(overlay: Path):
    """An overlay marked `# baseline` (ablate.py) resolves to its experiment's own config; every
    other overlay changes it. The experiment is the one the knob is meant for (KNOB_EXPERIMENT)."""
    experiment = EXPERIMENTS / f"{KNOB_EXPERIMENT.get(overlay.parent.name, 'default')}.yaml"
    cfg, own = resolved(experiment, overlay), resolved(experiment)
    assert cfg["experiment"] == own["experiment"]  # overlays hold deltas, not a new experiment
    assert overlay.read_text().startswith("#"), "each overlay says what it changes"
    if is_baseline(overlay):
        assert cfg == own, f"{overlay} is marked as the baseline but changes the config"
    else:
        changed = sorted(k for k in own if cfg[k] != own[k])
        assert changed, f"{overlay} changes nothing over {experiment.stem}: mark it `# baseline` or fix it"


@pytest.mark.parametrize("knob", sorted(p.name for p in ABLATION_DIR.iterdir() if p.is_dir()))
def test_every_knob_has_exactly_one_baseline_variant(knob: str):
    marked = [p.stem for p in sorted((ABLATION_DIR / knob).glob("*.yaml")) if is_baseline(p)]
    assert len(marked) == 1, (knob, marked)


def test_baseline_marker_is_a_line_of_its_own(tmp_path):
    overlay = tmp_path / "x.yaml"
    overlay.write_text("# the default, not a baseline marker: # baseline\naligner: {name: simct}\n")
    assert not is_baseline(overlay)
    overlay.write_text("# what it does\n# baseline\naligner: {name: simct}\n")
    assert is_baseline(overlay)


def test_overlays_hold_the_variants_the_issue_names():
    names = {f"{p.parent.name}/{p.stem}" for p in ABLATION_DIR.glob("*/*.yaml")}
    for required in ("aligner/exact", "aligner/simct", "aligner/simct_1to1", "aligner/alm", "aligner/uld",
                     "aligner/random_span_30", "loss/rkl_full", "loss/rkl_sampled", "loss/jsd",
                     "sod/off", "sod/on"):  # fmt: skip
        assert required in names
    assert load(EXPERIMENTS / "default.yaml", ABLATION_DIR / "aligner" / "random_span_30.yaml").aligner.ratio == 0.3


def test_parse_seeds():
    assert parse_seeds("0 1 2") == [0, 1, 2]
    assert parse_seeds("3,4") == [3, 4]
    with pytest.raises(ConfigError, match="integers"):
        parse_seeds("0 x")


def test_unknown_knob_names_the_directory(tmp_path):
    with pytest.raises(ConfigError, match="no overlays in .*nope"):
        plan(EXPERIMENTS / "default.yaml", "nope", [0], tmp_path)


def test_mean_sd_and_mean_curve_by_hand():
    assert mean_sd([0.3, 0.5]) == "0.400 ± 0.141"  # sample sd of {0.3, 0.5} = 0.1414
    assert mean_sd([0.25]) == "0.250 ± 0.000"
    assert mean_sd([0.1, 0.3], signed=True) == "+0.200 ± 0.141"
    assert mean_sd([]) == "—"
    steps, values = mean_curve([([0, 1, 2], [1.0, 2.0, 3.0]), ([0, 2], [3.0, 5.0])])
    assert steps == [0, 2] and values == [2.0, 4.0]  # only steps both runs logged


@pytest.fixture(scope="module")
def two_overlays(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ablation")
    (directory / "pair").mkdir()
    for name in ("exact", "simct"):
        shutil.copy(ABLATION_DIR / "aligner" / f"{name}.yaml", directory / "pair" / f"{name}.yaml")
    simct = directory / "pair" / "simct.yaml"  # this knob's baseline (the default's is bpm)
    simct.write_text("# baseline\n" + simct.read_text())
    return directory


def test_ablation_end_to_end_writes_a_table_that_matches_the_runs(tmp_path, two_overlays):
    out, log = tmp_path / "results", []
    overrides = [*TINY, f"run.cache_dir={tmp_path / 'cache'}"]
    result = ablate(EXPERIMENTS / "default.yaml", "pair", [0], out, overrides, ablation_dir=two_overlays, log=log.append)
    assert result["finished"] == 2 and result["failed"] == 0 and result["skipped"] == 0
    root = out / "default" / f"pair+{overrides_hash(overrides)}"  # the tiny sizes are overrides
    assert result["dir"] == str(root)
    for variant in ("exact", "simct"):
        summary = json.loads((root / variant / "seed0" / "summary.json").read_text())
        assert summary["aligner"] == variant and summary["steps"] == 2
        ablation = json.loads((root / variant / "seed0" / "ablation.json").read_text())
        assert ablation["variant"] == variant and ablation["baseline"] == (variant == "simct")
        # run.cache_dir and the progress bar change nothing trained: not counted
        assert ablation["overrides"] == sorted(x for x in TINY if not x.startswith("trainer.progress_bar"))
    assert any(line.startswith("[2/2] pair=simct seed=0") for line in log)
    assert any("left" in line for line in log if line.startswith("[2/2]"))  # a time estimate

    table = (root / "table.md").read_text()
    assert (root / "curves.png").stat().st_size > 1000
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    # simct's overlay is marked as the pair knob's baseline
    assert set(rows) == {"`exact`", "`simct` (baseline)"}
    for variant, label in (("exact", "`exact`"), ("simct", "`simct` (baseline)")):
        summary = json.loads((root / variant / "seed0" / "summary.json").read_text())
        cells = [c.strip() for c in rows[label].split("|")[1:-1]]
        assert cells[3] == f"{summary['student_accuracy_after']:.3f} ± 0.000"
        assert cells[5] == f"{summary['coverage']:.4f} ± 0.0000"
        with (root / variant / "seed0" / "metrics.csv").open() as f:  # mean over the logged steps
            logged = [r.get("train/teacher_mass") for r in csv.DictReader(f)]
        masses = [float(m) for m in logged if m]
        assert len(masses) == 2 and all(0 < m <= 1 for m in masses)
        assert cells[6] == f"{sum(masses) / len(masses):.4f} ± 0.0000"
        assert cells[7] == f"{summary['final_loss']:.4f} ± 0.0000"
        assert float(cells[8].split()[0]) == pytest.approx(summary["steps_per_second"], abs=0.006)
        assert summary["steps_per_second"] == pytest.approx(summary["steps"] / summary["train_seconds"])

    # everything finished: a second call trains nothing
    again = ablate(EXPERIMENTS / "default.yaml", "pair", [0], out, overrides, ablation_dir=two_overlays, log=log.append)
    assert again["skipped"] == 2 and again["finished"] == 2

    # an interrupted run (no summary.json) is run again; the other is skipped
    (root / "simct" / "seed0" / "summary.json").unlink()
    log.clear()
    third = ablate(EXPERIMENTS / "default.yaml", "pair", [0], out, overrides, ablation_dir=two_overlays, log=log.append)
    assert third["skipped"] == 1 and third["finished"] == 2 and third["failed"] == 0
    resumed = json.loads((root / "simct" / "seed0" / "summary.json").read_text())
    assert resumed["steps"] == 2 and resumed["steps_per_second"] is None  # nothing left to train
    assert any("pair=simct seed=0 (resuming)" in line for line in log)

    # the report command rebuilds the same table from the run directories
    assert main(["report", str(root), "--out", str(tmp_path / "report")]) == 0
    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| `")]

    rebuilt = (tmp_path / "report" / "table.md").read_text()
    assert body(rebuilt)[0] == body(table)[0]  # exact: untouched
    simct = [c.strip() for c in body(rebuilt)[1].split("|")[1:-1]]
    # the resumed run kept its metrics: coverage, teacher mass and loss as before the interruption
    before = [c.strip() for c in body(table)[1].split("|")[1:-1]]
    assert simct[5:8] == before[5:8]


def test_summarise_groups_seeds_of_a_variant(tmp_path):
    for seed, after in ((0, 0.3), (1, 0.5)):
        run = tmp_path / "v" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "ablation.json").write_text(json.dumps({"knob": "k", "variant": "v", "seed": seed}))
        (run / "summary.json").write_text(json.dumps({
            "experiment": "e", "aligner": "simct", "student_accuracy_before": 0.1, "student_accuracy_after": after,
            "coverage": 0.9, "final_loss": 1.0, "steps": 10, "train_seconds": 5.0, "accuracy_history": [[0, 0.1], [10, after]],
        }))  # fmt: skip
        mass = (0.8, 0.9) if seed == 0 else (0.6, 0.7)  # per-run means 0.85 and 0.65
        (run / "metrics.csv").write_text("step,train/tool_calls,train/tool_success_rate,train/teacher_mass\n"
                                         f"0,1.0,0.5,{mass[0]}\n1,2.0,1.0,{mass[1]}\n")  # fmt: skip
    (summary,) = summarise(find_runs([tmp_path]))
    assert summary.seeds == [0, 1]
    assert summary.tool_calls == [1.5, 1.5] and summary.tool_success == [0.75, 0.75]
    assert summary.teacher_mass == pytest.approx([0.85, 0.65])
    header, _, row = markdown_table([summary]).splitlines()
    assert header.endswith("| tool calls / response | tool success |")
    assert row.endswith("| 1.50 ± 0.00 | 0.750 ± 0.000 |")
    cells = dict(zip(header.split("|")[1:-1], row.split("|")[1:-1], strict=True))
    # mean 0.75, sample sd of {0.85, 0.65} = 0.1414
    assert cells[" teacher mass "].strip() == "0.7500 ± 0.1414"
    assert cells[" coverage "].strip() == "0.9000 ± 0.0000"
    assert cells[" final loss "].strip() == "1.0000 ± 0.0000"
    assert mean_sd(summary.after) == "0.400 ± 0.141"
    assert mean_sd(summary.gain, signed=True) == "+0.300 ± 0.141"
    assert summary.steps_per_second == [2.0, 2.0]


def test_report_errors_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2  # exists, holds no runs
    assert "no finished runs" in capsys.readouterr().err


def test_ablate_command_takes_overrides_before_and_after_the_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("lightning_opd.cli.ablate.ablate", lambda exp, knob, seeds, out, overrides, only: seen.update(
        knob=knob, seeds=seeds, overrides=list(overrides), only=only) or {"failed": 0})  # fmt: skip
    experiment = str(EXPERIMENTS / "default.yaml")
    assert main(["ablate", experiment, "a.b=1", "--knob", "aligner", "--seeds", "0 1", "c.d=2"]) == 0
    assert seen == {"knob": "aligner", "seeds": [0, 1], "overrides": ["a.b=1", "c.d=2"], "only": None}
    assert main(["ablate", experiment, "--knob", "aligner", "--only", "uld,exact"]) == 0
    assert seen["only"] == ["uld", "exact"]
    with pytest.raises(SystemExit):
        main(["ablate", experiment, "--knob", "aligner", "--bogus"])


def test_report_marks_the_baseline_variant(tmp_path):
    for variant, baseline in (("off", True), ("on", False)):
        run = tmp_path / variant / "seed0"
        run.mkdir(parents=True)
        (run / "ablation.json").write_text(json.dumps({"knob": "sod", "variant": variant, "seed": 0, "baseline": baseline}))
        (run / "summary.json").write_text(json.dumps({"student_accuracy_before": 0.1, "student_accuracy_after": 0.2}))
    legacy = tmp_path / "old" / "seed0"  # written before the flag existed: not a baseline
    legacy.mkdir(parents=True)
    (legacy / "ablation.json").write_text(json.dumps({"knob": "sod", "variant": "old", "seed": 0}))
    (legacy / "summary.json").write_text(json.dumps({}))
    table = markdown_table(summarise(find_runs([tmp_path]))).splitlines()
    labels = [line.split("|")[1].strip() for line in table[2:]]
    assert sorted(labels) == ["`off` (baseline)", "`old`", "`on`"]
    # no metrics.csv, so no train/teacher_mass: the column is there, with a dash
    column = [c.strip() for c in table[0].split("|")].index("teacher mass")
    assert [line.split("|")[column].strip() for line in table[2:]] == ["—"] * 3


def test_plan_only_runs_the_named_variants_in_that_order(tmp_path):
    from lightning_opd.cli.ablate import plan

    _, runs = plan(EXPERIMENTS / "default.yaml", "aligner", [0, 1], tmp_path, only=["uld", "exact"])
    assert [(r.variant, r.seed) for r in runs] == [("uld", 0), ("uld", 1), ("exact", 0), ("exact", 1)]
    with pytest.raises(ConfigError, match="no overlays \\['nope'\\]"):
        plan(EXPERIMENTS / "default.yaml", "aligner", [0], tmp_path, only=["nope"])


# --- overrides get a directory of their own; report rows by models --------------------------------


def test_overrides_give_the_ablation_a_directory_of_its_own(tmp_path):
    default = EXPERIMENTS / "default.yaml"

    def root(*overrides: str) -> Path:
        _, runs = plan(default, "aligner", [0], tmp_path, only=["exact"], overrides=list(overrides))
        return runs[0].run_dir.parent.parent

    assert root() == tmp_path / "default" / "aligner"  # no overrides: the path as before
    lr = root("optim.lr=1e-3")
    assert lr.parent == tmp_path / "default" and lr.name == f"aligner+{overrides_hash(['optim.lr=1e-3'])}"
    assert len(lr.name) == len("aligner+") + 8
    assert root("optim.lr=1e-3", "loss.beta=0.1") == root("loss.beta=0.1", "optim.lr=1e-3")  # order
    assert root("optim.lr=1e-2", "optim.lr=1e-3") == lr  # the last value of a key wins, as in load
    assert root("optim.lr=1e-3", "run.cache_dir=/elsewhere", "trainer.progress_bar=false") == lr  # neutral keys
    assert root("trainer.progress_bar=false") == root()
    assert root("optim.lr=3e-3") != lr and root("student.path=Org/model") != lr
    assert overrides_key(["b=2", "a=1", "b=3", "data.seed=4"]) == ["a=1", "b=3"]


def fake_train(calls: list[Path]):
    """A stand-in for `train`: writes what a finished run leaves (config.yaml, summary.json)."""

    def train(cfg) -> dict:
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        save(cfg, run_dir / "config.yaml")
        summary = {"experiment": cfg.experiment, "aligner": cfg.aligner.name, "student_accuracy_before": 0.0,
                   "student_accuracy_after": cfg.student.tiny.hidden_size / 100, "coverage": 1.0,
                   "final_loss": 0.1, "steps": 1, "train_seconds": 1.0}  # fmt: skip
        (run_dir / "summary.json").write_text(json.dumps(summary))
        calls.append(run_dir)
        return summary

    return train


def test_ablate_again_with_other_overrides_runs_again_and_the_report_tells_them_apart(
    tmp_path, two_overlays, monkeypatch
):
    calls: list[Path] = []
    monkeypatch.setattr("lightning_opd.train.train", fake_train(calls))
    out, experiment = tmp_path / "results", EXPERIMENTS / "default.yaml"
    small, large = ["student.tiny.hidden_size=32"], ["student.tiny.hidden_size=48"]
    first = ablate(experiment, "pair", [0], out, small, ablation_dir=two_overlays, log=lambda _: None)
    assert (first["finished"], first["skipped"], len(calls)) == (2, 0, 2)
    again = ablate(experiment, "pair", [0], out, small, ablation_dir=two_overlays, log=lambda _: None)
    assert (again["skipped"], len(calls)) == (2, 2)  # the same overrides: finished, skipped
    other = ablate(experiment, "pair", [0], out, large, ablation_dir=two_overlays, log=lambda _: None)
    assert (other["finished"], other["skipped"], len(calls)) == (2, 0, 4)  # other overrides: run, not "finished"
    assert other["dir"] != first["dir"]
    recorded = json.loads((Path(other["dir"]) / "exact" / "seed0" / "ablation.json").read_text())
    assert recorded["overrides"] == large and recorded["overrides_hash"] == overrides_hash(large)
    # each knob directory's own table holds its own runs only, with plain labels; its title
    # says which overrides made them
    own = (Path(first["dir"]) / "table.md").read_text().splitlines()
    assert own[0] == "# default: pair (student.tiny.hidden_size=32)"
    assert [line.split("|")[1].strip() for line in own if line.startswith("| `")] == ["`exact`", "`simct` (baseline)"]

    # a report over both: one row per variant and model, labelled with what tells them apart
    table = markdown_table(summarise(find_runs([out / "default"])))
    labels = sorted(line.split("|")[1].strip() for line in table.splitlines()[2:])
    assert labels == ["`exact` [student.tiny.hidden_size=32]", "`exact` [student.tiny.hidden_size=48]",
                      "`simct` (baseline) [student.tiny.hidden_size=32]",
                      "`simct` (baseline) [student.tiny.hidden_size=48]"]  # fmt: skip


def write_run(directory: Path, variant: str, seed: int, after: float, *overrides: str) -> None:
    directory.mkdir(parents=True)
    save(load(overrides=[*overrides, f"trainer.seed={seed}"]), directory / "config.yaml")
    (directory / "ablation.json").write_text(json.dumps({"knob": "k", "variant": variant, "seed": seed}))
    (directory / "summary.json").write_text(json.dumps({"student_accuracy_before": 0.0, "student_accuracy_after": after}))


def test_report_groups_a_variant_by_its_models(tmp_path):
    write_run(tmp_path / "a" / "exact" / "seed0", "exact", 0, 0.2, "student.path=Org/small", "teacher.path=Org/big")
    write_run(tmp_path / "a" / "exact" / "seed1", "exact", 1, 0.4, "student.path=Org/small", "teacher.path=Org/big")
    write_run(tmp_path / "b" / "exact" / "seed0", "exact", 0, 0.9, "student.path=Org/other", "teacher.path=Org/big")
    write_run(tmp_path / "a" / "simct" / "seed0", "simct", 0, 0.5, "student.path=Org/small", "teacher.path=Org/big")
    rows = {s.label: s for s in summarise(find_runs([tmp_path]))}
    assert set(rows) == {"exact [student.path=Org/small]", "exact [student.path=Org/other]",
                         "simct [student.path=Org/small]"}  # fmt: skip
    assert rows["exact [student.path=Org/small]"].seeds == [0, 1]
    assert rows["exact [student.path=Org/small]"].after == [0.2, 0.4]  # never merged with Org/other's 0.9
    assert rows["exact [student.path=Org/other]"].after == [0.9]
    # the same models: one row per variant, labels as before
    same = find_runs([tmp_path / "a"])
    assert [s.label for s in summarise(same)] == ["exact", "simct"]


def test_report_tells_tokenizer_settings_apart(tmp_path):
    write_run(tmp_path / "x" / "seed0", "bpm", 0, 0.5)
    write_run(tmp_path / "y" / "seed0", "bpm", 0, 0.1, "student.tokenizer.digits=split")
    assert sorted(s.label for s in summarise(find_runs([tmp_path]))) == [
        "bpm [student.tokenizer.digits=merge]", "bpm [student.tokenizer.digits=split]"]


def test_a_checkpoint_cut_short_is_not_resumed_from(tmp_path):
    import torch

    _, (run,) = plan(EXPERIMENTS / "default.yaml", "aligner", [0], tmp_path, only=["exact"])
    last = run.run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 cut short")
    assert run_config(EXPERIMENTS / "default.yaml", run, "aligner", []).run.resume_from is None
    torch.save({"global_step": 1}, last)
    assert run_config(EXPERIMENTS / "default.yaml", run, "aligner", []).run.resume_from == str(last)


def test_report_does_not_split_on_a_setting_older_runs_lack_but_on_a_missing_config(tmp_path):
    write_run(tmp_path / "new" / "seed0", "bpm", 0, 0.5)
    write_run(tmp_path / "old" / "seed1", "bpm", 1, 0.3)
    old = OmegaConf.load(tmp_path / "old" / "seed1" / "config.yaml")
    del old.student.tokenizer["eos"]  # written before tokenizer.eos existed: the same models
    OmegaConf.save(old, tmp_path / "old" / "seed1" / "config.yaml")
    (summary,) = summarise(find_runs([tmp_path]))
    assert (summary.label, summary.seeds) == ("bpm", [0, 1])
    write_run(tmp_path / "bare" / "seed2", "bpm", 2, 0.9)
    (tmp_path / "bare" / "seed2" / "config.yaml").unlink()
    labels = {s.label: s.seeds for s in summarise(find_runs([tmp_path]))}
    assert labels == {"bpm": [0, 1], "bpm [models unknown (no config.yaml)]": [2]}
