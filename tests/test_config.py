"""Config merging, overrides, and errors that name the key and where it came from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lightning_opd import config as config_module
from lightning_opd.cli import main
from lightning_opd.config import Config, ConfigError, load

ROOT = Path(__file__).resolve().parent.parent


def _keys(node, prefix=""):
    out = set()
    for k, v in node.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _keys(v, prefix + k + ".")
    return out


def test_base_yaml_lists_every_schema_default_with_same_value():
    schema = OmegaConf.to_container(OmegaConf.structured(Config))
    base = yaml.safe_load((ROOT / "configs" / "base.yaml").read_text())
    assert _keys(base) == _keys(schema)
    # base.yaml repeats the defaults: merging it onto the schema changes nothing
    assert OmegaConf.to_container(load()) == OmegaConf.to_container(load(base=False))


def test_every_base_yaml_setting_has_a_comment():
    lines = (ROOT / "configs" / "base.yaml").read_text().splitlines()
    # the teacher block repeats the student's keys; their comments are on the student's lines
    start = next(i for i, line in enumerate(lines) if line.startswith("teacher:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("rollout:"))
    for n, line in enumerate(lines):
        setting = line.strip() and not line.strip().startswith("#") and not line.rstrip().endswith(":")
        if setting and not start < n < end:
            assert "#" in line, f"configs/base.yaml:{n + 1} has no comment: {line!r}"


def test_experiment_overrides_base_and_command_line_overrides_experiment(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("trainer:\n  max_steps: 7\nloss:\n  divergence: jsd\n")
    cfg = load(exp, overrides=["trainer.max_steps=20", "aligner.name=exact"])
    assert cfg.trainer.max_steps == 20
    assert cfg.loss.divergence == "jsd"
    assert cfg.data.batch_size == 64  # untouched default


def test_unknown_key_in_file_names_the_key_and_the_file(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("trainer:\n  max_stepz: 7\n")
    with pytest.raises(ConfigError) as err:
        load(exp)
    assert "trainer.max_stepz" in str(err.value)
    assert str(exp) in str(err.value)


def test_unknown_key_on_command_line_is_reported_as_such():
    with pytest.raises(ConfigError, match=r"command line.*rollout\.temprature"):
        load(overrides=["rollout.temprature=0.5"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        load(overrides=["trainer.max_steps=many"])


def test_bad_choice_is_an_error():
    with pytest.raises(ConfigError, match=r"loss\.divergence"):
        load(overrides=["loss.divergence=hellinger"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load(overrides=["trainer.max_steps"])


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "nope.yaml")


def test_every_experiment_config_loads():
    files = sorted((ROOT / "configs" / "experiment").glob("*.yaml"))
    assert files, "no experiment configs"
    for f in files:
        load(f)


def test_cli_exits_2_with_a_one_line_message_on_unknown_key(capsys):
    code = main(["config", str(ROOT / "configs/experiment/default.yaml"), "optim.lrr=1"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lrr" in err and len(err.splitlines()) == 1


# every check that reads more than one value or an aligner option: `lightning-opd config` catches
# it (it used to surface only in OPDModule.setup or an aligner's constructor)
CROSS_FIELD = [
    (["aligner.ratio=1.5"], "aligner.ratio"),
    (["aligner.alm_temperature=0"], "aligner.alm_temperature"),
    (["aligner.name=nope"], "aligner.name"),
    (["aligner.span_logit=max_logit"], "aligner.span_logit"),
    (["loss.temperature=0"], "loss.temperature"),
    (["tools.enabled=true", "rollout.engine=vllm"], "rollout.engine=vllm"),
]


@pytest.mark.parametrize(("overrides", "key"), CROSS_FIELD, ids=lambda x: str(x))
def test_config_command_exits_2_on_a_bad_combination_naming_the_key(capsys, overrides, key):
    code = main(["config", str(ROOT / "configs/experiment/default.yaml"), *overrides])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1


def test_tools_with_fsdp_on_one_or_more_devices_are_accepted():
    # tool rollouts are synchronised across ranks (rollout/tools.py), no longer refused
    load(overrides=["tools.enabled=true", "trainer.strategy=fsdp", "trainer.devices=1"])
    load(overrides=["tools.enabled=true", "trainer.strategy=fsdp", "trainer.devices=2"])
    load(overrides=["tools.enabled=true", "trainer.strategy=fsdp", "trainer.num_nodes=2"])
    load(overrides=["trainer.strategy=fsdp", "trainer.devices=2"])


def test_schema_sections_are_dataclasses():
    for f in dataclasses.fields(Config):
        if f.name != "experiment":
            assert dataclasses.is_dataclass(f.default_factory())  # type: ignore[misc]
    assert config_module.BASE_CONFIG.is_file()


# checked at config time, before any preparation: each a one-line error naming the key
EARLY = [
    (["data.source=gsm9k"], "data.source"),
    (["student.tiny.arch=gpt2"], "student.tiny.arch"),
    (["teacher.tiny.arch=mamba"], "teacher.tiny.arch"),
    (["trainer.accelerator=tpu"], "trainer.accelerator"),
    (["rollout.temperature=-0.5"], "rollout.temperature"),
    (["data.batch_size=0"], "data.batch_size"),
    (["run.resume_from=/no/such/run/last.ckpt"], "run.resume_from"),
    (["student.path=./no-such-model"], "student.path"),
    (["student.path=../no-such-model"], "student.path"),
    (["teacher.path=/no/such/model"], "teacher.path"),
    (["student.path=./model.Q4_K_M.gguf"], "student.path"),
    (["aligner.name=foo"], "aligner.name"),
]


@pytest.mark.parametrize(("overrides", "key"), EARLY, ids=lambda x: str(x))
def test_config_command_exits_2_on_a_bad_value_naming_the_key(capsys, overrides, key):
    code = main(["config", *overrides])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert f"config error: {key}" in err and len(err.splitlines()) == 1


def test_a_path_under_an_existing_folder_is_local_and_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ConfigError, match=r"student\.path='models/missing': no such local folder"):
        load(overrides=["student.path=models/missing"])
    (tmp_path / "models" / "mine").mkdir()
    load(overrides=["student.path=models/mine"])
    load(overrides=["student.path=Org/hub-model"])  # no folder Org here: a hub id, not looked up


def test_accepted_edge_values(tmp_path):
    import torch

    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 0}, ckpt)  # a readable checkpoint file (an empty one is refused: test_errors.py)
    cfg = load(overrides=["rollout.temperature=0", "data.batch_size=1", f"run.resume_from={ckpt}",
                          f"student.path={tmp_path}", "trainer.accelerator=cpu"])  # fmt: skip
    assert cfg.rollout.temperature == 0.0
    load(overrides=["run.resume_from=last"])  # a name Lightning resolves itself


def test_temperature_zero_rolls_out_greedily():
    from lightning_opd.rollout.generate import sampling_kwargs

    assert sampling_kwargs(load(overrides=["rollout.temperature=0"]).rollout, greedy=False) == {"do_sample": False}
    assert sampling_kwargs(load().rollout, greedy=False)["do_sample"] is True


def test_gpu_without_cuda_stops_before_any_work(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code = main(["train", "trainer.accelerator=gpu", f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path}/c"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "trainer.accelerator=gpu" in err and "trainer.accelerator=cpu" in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run directory, no cache: nothing was prepared
