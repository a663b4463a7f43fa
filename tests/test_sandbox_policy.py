"""The sandbox fails closed: without working bubblewrap a tool call is refused, training stops
before it starts, and the explicit opt-in never runs model code as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_opd.config import ConfigError, load
from lightning_opd.rollout import sandbox
from lightning_opd.rollout.sandbox import run_python
from lightning_opd.train import train

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)


def test_call_is_refused_without_bwrap(no_bwrap: None, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = run_python(f"open({str(marker)!r}, 'w').write('x')\nprint('ran')")
    assert not result.ok and result.stdout == "" and not marker.exists()
    assert result.error.startswith("tool calls are refused, no isolation: bubblewrap (bwrap) not found")
    assert "apt-get install bubblewrap" in result.error
    assert "tools.sandbox.allow_unsandboxed=true" in result.error


def test_call_is_refused_with_broken_bwrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # bwrap present but unusable (e.g. a container forbidding namespaces): the probe notices.
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: str(fake))
    result = run_python("print(1)")
    assert not result.ok and result.stdout == ""
    assert "cannot create a sandbox" in result.error and "No permissions" in result.error
    assert "install bubblewrap" in result.error


def test_training_with_tools_stops_before_preparation(no_bwrap: None, tmp_path: Path) -> None:
    cfg = load(PROJECT / "configs/experiment/arith_tool_opd.yaml",
               overrides=[f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path}/cache"])
    with pytest.raises(ConfigError, match=r"tools.enabled=true: tool calls are refused.*"
                                          r"apt-get install bubblewrap"):
        train(cfg)
    assert not any(tmp_path.iterdir())  # refused before any run directory or SFT


def test_opt_in_never_runs_as_root(no_bwrap: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_warned", True)  # the warning has its own test below
    result = run_python("import os\nprint(os.getuid(), os.geteuid())", allow_unsandboxed=True)
    if result.ok:
        assert 0 not in map(int, result.stdout.split())
    else:  # refused (root, and the interpreter is unreachable for a leased uid) or failed
        assert result.stdout == ""
        if os.geteuid() == 0 and not sandbox._world_traversable(sandbox.sys.base_prefix):
            assert result.error.startswith("refusing to run model code as root")


@pytest.mark.skipif(os.geteuid() == 0 and not sandbox._world_traversable(sandbox.sys.base_prefix),
                    reason="as root the opt-in needs an interpreter an unprivileged uid can reach")
def test_opt_in_warns_once_and_runs(no_bwrap: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="UNSANDBOXED"):
        first = run_python("print(6 * 7)", allow_unsandboxed=True)
    second = run_python("print(7 * 6)", allow_unsandboxed=True)
    assert first.stdout == second.stdout == "42\n"


def test_sandbox_settings_are_checked_at_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tools.sandbox.disk_mb must be > 0"):
        load(PROJECT / "configs/experiment/arith_tool_opd.yaml", overrides=["tools.sandbox.disk_mb=0"])
    with pytest.raises(ConfigError, match="require_isolation"):  # the old key is gone, loudly
        load(PROJECT / "configs/experiment/arith_tool_opd.yaml",
             overrides=["tools.sandbox.require_isolation=true"])
