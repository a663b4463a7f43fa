"""Tests for lightning_opd.rollout.sandbox: results, limits, containment and isolation."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from lightning_opd.rollout import sandbox
from lightning_opd.rollout.sandbox import run_python, run_python_batch

PROJECT = Path(__file__).resolve().parents[1]
# Probed once at import, before any test monkeypatches the module (the probe result is cached).
ISOLATION_PROBLEM = sandbox.isolation_problem()
needs_bwrap = pytest.mark.skipif(
    ISOLATION_PROBLEM is not None,
    reason=f"needs working bubblewrap namespaces (without them this is not isolated): "
    f"{ISOLATION_PROBLEM}",
)
# Root ignores RLIMIT_NPROC: without bwrap the sandbox can only bound processes by dropping to
# nobody, which needs an interpreter that nobody can reach.
PROCS_BOUNDED = (
    ISOLATION_PROBLEM is None
    or os.geteuid() != 0
    or sandbox._sandbox_uid(isolated=False) is not None
)


def _host_still_works() -> None:
    out = subprocess.run([sys.executable, "-c", "print('host ok')"], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout == "host ok\n"


def _process_count() -> int:
    return sum(name.isdigit() for name in os.listdir("/proc"))


def _sandbox_dirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("opd-sandbox-")}


def test_print_returns_stdout() -> None:
    result = run_python("print('hello', 6 * 7)")
    assert result == sandbox.ToolResult("hello 42\n", "", ok=True, timed_out=False, error=None)


def test_exception_gives_traceback() -> None:
    result = run_python("def f():\n    raise ValueError('boom')\nf()")
    assert not result.ok and not result.timed_out
    assert "Traceback" in result.stderr and "ValueError: boom" in result.stderr
    assert result.error == "exited with code 1"


def test_infinite_loop_times_out() -> None:
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert time.monotonic() - start < 3.0
    assert result.timed_out and not result.ok
    assert "timed out" in result.error


def test_background_child_does_not_hold_the_call() -> None:
    # The child inherits stdout and sleeps; the call must end when the main process does.
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nprint('parent done')"
    start = time.monotonic()
    result = run_python(code, timeout_s=20.0)
    assert time.monotonic() - start < 5.0
    assert result.ok and result.stdout == "parent done\n"


@pytest.mark.skipif(
    not PROCS_BOUNDED,
    reason="root without bubblewrap: RLIMIT_NPROC is ignored and the interpreter is "
    "unreachable for nobody, so a fork bomb would be unbounded",
)
def test_fork_bomb_is_contained() -> None:
    base, peak, stop = _process_count(), [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _process_count())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    try:
        result = run_python(bomb, timeout_s=3.0)
    finally:
        stop.set()
        watcher.join()
    assert time.monotonic() - start < 8.0
    assert not result.ok
    assert peak[0] - base < 400, f"{peak[0] - base} extra processes: not contained"
    deadline = time.monotonic() + 5.0  # every bomb process is gone again
    while _process_count() > base + 30 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _process_count() <= base + 30
    _host_still_works()


def test_memory_bomb_fails_inside() -> None:
    result = run_python("b = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr and "allocated" not in result.stdout
    _host_still_works()


def test_file_size_is_limited() -> None:
    code = "with open('big.bin', 'wb') as f:\n    f.write(b'0' * (100 << 20))\nprint('wrote')"
    result = run_python(code, memory_mb=512)
    assert not result.ok and "wrote" not in result.stdout
    assert "File too large" in result.stderr  # Python ignores SIGXFSZ, so write() gets EFBIG


def test_workdir_is_fresh_and_removed() -> None:
    before = _sandbox_dirs()
    result = run_python("import os\nopen('note.txt', 'w').write('x')\nprint(sorted(os.listdir()))")
    assert result.ok and result.stdout == "['main.py', 'note.txt']\n"
    assert _sandbox_dirs() == before


@needs_bwrap
def test_writes_outside_workdir_vanish(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    targets = [PROJECT / f"SANDBOX_ESCAPE_{tag}", tmp_path / "escape.txt", Path(f"/tmp/x_{tag}")]
    code = (
        "import json\nres = {}\n"
        f"for p in {[str(t) for t in targets]!r}:\n"
        "    try:\n        open(p, 'w').write('x')\n        res[p] = 'written'\n"
        "    except OSError as e:\n        res[p] = type(e).__name__\n"
        "print(json.dumps(res))"
    )
    try:
        result = run_python(code)
        assert result.ok, result.stderr
        assert not any(path.exists() for path in targets), json.loads(result.stdout)
    finally:
        for path in targets:
            path.unlink(missing_ok=True)


def test_parent_secrets_are_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPD_SECRET_TOKEN", "hunter2-do-not-leak")
    result = run_python("import json, os\nprint(json.dumps(dict(os.environ)))")
    assert result.ok
    assert "hunter2" not in result.stdout
    assert set(json.loads(result.stdout)) <= {"LANG", "PYTHONDONTWRITEBYTECODE"}


@needs_bwrap
def test_loopback_network_is_unreachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        code = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "    print('CONNECTED')\n"
            "except OSError as e:\n    print('BLOCKED', type(e).__name__)"
        )
        result = run_python(code)
        assert result.ok and result.stdout.startswith("BLOCKED"), result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the listener
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # the listener works


@needs_bwrap
def test_home_and_project_are_hidden() -> None:
    home = Path.home()
    code = (
        "import json, os\n"
        f"home = {str(home)!r}\n"
        "print(json.dumps({\n"
        f"    'test_file': os.path.exists({__file__!r}),\n"
        f"    'project': os.path.exists({str(PROJECT)!r}),\n"
        "    'home': sorted(os.listdir(home)) if os.path.isdir(home) else [],\n"
        "}))"
    )
    result = run_python(code)
    assert result.ok, result.stderr
    seen = json.loads(result.stdout)
    assert os.path.exists(__file__) and not seen["test_file"] and not seen["project"]
    # Only the path down to the base interpreter may show up (e.g. ~/.pyenv under pyenv).
    base = Path(sys.base_prefix).resolve()
    allowed = {base.relative_to(home).parts[0]} if base.is_relative_to(home) else set()
    assert set(seen["home"]) <= allowed


def test_large_output_is_truncated() -> None:
    code = "import sys\nprint('x' * 10_000_000)\nsys.stderr.write('y' * 10_000_000)"
    result = run_python(code, max_output_bytes=65536)
    assert result.ok
    assert len(result.stdout) <= 65536 + 64 and len(result.stderr) <= 65536 + 64
    assert result.stdout == "x" * 65536 + f"\n...[truncated {10_000_001 - 65536} bytes]"
    assert result.stderr.startswith("y" * 65536) and "truncated" in result.stderr


def test_batch_of_32_concurrent_runs() -> None:
    # Later entries finish first, so input order must come from the implementation.
    codes = [f"import time\ntime.sleep({(31 - i) * 0.01})\nprint({i} * {i})" for i in range(32)]
    results = run_python_batch(codes, max_workers=32, timeout_s=60.0)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(32)]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]


def test_require_isolation_without_bwrap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    result = run_python("print(1)", require_isolation=True)
    assert not result.ok and result.stdout == ""
    assert result.error.startswith("bubblewrap (bwrap) not found; install the Debian package")


def test_require_isolation_with_broken_bwrap(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # bwrap present but unusable (e.g. a container forbidding namespaces): the probe notices.
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: str(fake))
    result = run_python("print(1)", require_isolation=True)
    assert not result.ok and result.stdout == ""
    assert "cannot create a sandbox" in result.error and "No permissions" in result.error


def test_fallback_warns_once_and_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="UNSANDBOXED"):
        first = run_python("print(6 * 7)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        second = run_python("print(7 * 6)")
    assert first.stdout == second.stdout == "42\n"
    assert not [w for w in caught if "UNSANDBOXED" in str(w.message)]


def test_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = [
        run_python(None),  # type: ignore[arg-type]
        run_python("print(1)", timeout_s=0),
        run_python("print('a')\x00"),
        run_python("s = '\udcff'"),
    ]
    monkeypatch.setattr(sandbox, "_interpreter", lambda: "/nonexistent/bin/python3")
    bad.append(run_python("print(1)"))
    for result in bad:
        assert isinstance(result, sandbox.ToolResult)
        assert not result.ok and result.error
