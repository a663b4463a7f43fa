"""Tests for lightning_opd.rollout.sandbox: results, limits, containment and isolation."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from lightning_opd.rollout import sandbox
from lightning_opd.rollout.sandbox import run_python, run_python_batch

PROJECT = Path(__file__).resolve().parents[1]
# Probed once at import, before any test monkeypatches the module (the probe result is cached).
ISOLATION_PROBLEM = sandbox.isolation_problem()
needs_bwrap = pytest.mark.skipif(
    ISOLATION_PROBLEM is not None,
    reason=f"needs working bubblewrap namespaces (without them every call is refused): "
    f"{ISOLATION_PROBLEM}",
)
# Per-call uids (and so per-call process and memory budgets) exist only when the trainer is root.
needs_root_and_bwrap = pytest.mark.skipif(
    ISOLATION_PROBLEM is not None or os.geteuid() != 0,
    reason="per-call uids need root and working bubblewrap",
)
pytestmark = needs_bwrap  # the default fails closed: without bwrap nothing runs


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


def test_workdir_is_fresh_and_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []  # this call's host directories (other runs may use /tmp meanwhile)
    original = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs) -> str:
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    result = run_python("import os\nopen('note.txt', 'w').write('x')\nprint(sorted(os.listdir()))")
    assert result.ok and result.stdout == "['main.py', 'note.txt']\n"
    assert made and not any(os.path.exists(path) for path in made)


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


def test_large_output_keeps_head_and_tail() -> None:
    # Results are printed last: a flood before them must not cost the last line.
    code = ("import sys\nprint('x' * 10_000_000)\nsys.stderr.write('y' * 10_000_000)\n"
            "print('RESULT 42')")
    result = run_python(code, max_output_bytes=65536)
    assert result.ok
    dropped = 10_000_001 + len("RESULT 42\n") - 65536
    assert result.stdout == ("x" * 32768 + f"\n...[truncated {dropped} bytes]...\n"
                             + "x" * (32768 - 11) + "\nRESULT 42\n")
    assert result.stderr.startswith("y" * 32768) and result.stderr.endswith("y" * 32768)
    assert len(result.stderr) <= 65536 + 64


def test_batch_of_32_concurrent_runs() -> None:
    # Later entries finish first, so input order must come from the implementation.
    codes = [f"import time\ntime.sleep({(31 - i) * 0.01})\nprint({i} * {i})" for i in range(32)]
    results = run_python_batch(codes, max_workers=32, timeout_s=60.0)
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(32)]
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]


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


# --- limits that hold per call, and calls that cannot touch each other --------------------------

_FILLER = """\
import errno, os
written, error = 0, None
try:
    for i in range(10_000):
        with open(os.path.join({where!r}, f"fill{{i}}.bin"), "wb") as fh:
            fh.write(b"0" * (1 << 20))
        written += 1
except OSError as err:
    error = errno.errorcode[err.errno]
print(written, error)
"""


@pytest.mark.parametrize("where", ["/tmp", "."], ids=["tmp", "workdir"])
def test_filler_stops_at_disk_mb(where: str) -> None:
    host_before = shutil.disk_usage(tempfile.gettempdir()).used
    result = run_python(_FILLER.format(where=where), disk_mb=8, memory_mb=256)
    assert result.ok, result.stderr
    written, error = result.stdout.split()
    assert int(written) <= 8 and error == "ENOSPC"
    # nothing reached the host's /tmp (other processes may write there, hence the slack)
    assert shutil.disk_usage(tempfile.gettempdir()).used - host_before < (4 << 20)


@needs_root_and_bwrap
def test_fork_bomb_beside_a_normal_call() -> None:
    bomb = ("import os, time\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        time.sleep(0.001)")
    # The neighbour starts subprocesses while the bomb holds its own uid's whole budget.
    normal = ("import subprocess, sys, time\ntime.sleep(0.5)\nouts = []\nfor i in range(10):\n"
              "    outs.append(subprocess.run([sys.executable, '-c', f'print({i})'],"
              " capture_output=True, text=True, check=True).stdout.strip())\n"
              "print(' '.join(outs))")
    bombed, neighbour = run_python_batch([bomb, normal], timeout_s=4.0, max_processes=32)
    assert not bombed.ok and bombed.timed_out
    assert neighbour.ok, neighbour.stderr + str(neighbour.error)
    assert neighbour.stdout == "0 1 2 3 4 5 6 7 8 9\n"
    _host_still_works()


@needs_root_and_bwrap
def test_concurrent_calls_run_as_distinct_unprivileged_uids() -> None:
    results = run_python_batch(["import os, time\ntime.sleep(0.3)\nprint(os.getuid(), os.geteuid())"] * 8)
    uids = [tuple(map(int, r.stdout.split())) for r in results]
    assert all(real == effective for real, effective in uids)
    assert len({real for real, _ in uids}) == 8 and min(real for real, _ in uids) >= 1000


@needs_root_and_bwrap
def test_memory_of_all_processes_is_bounded() -> None:
    # Each child stays under the per-process address-space limit; together they do not.
    code = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n"
            "        block = bytearray(120 << 20)\n        time.sleep(10)\n        os._exit(0)\n"
            "time.sleep(10)\nprint('survived')")
    result = run_python(code, memory_mb=256, timeout_s=8.0)
    assert not result.ok and "survived" not in result.stdout
    assert result.error == "killed: the call's processes exceeded 256 MB"


def test_the_trainer_is_out_of_reach() -> None:
    # Neither signal it nor read its environment: it is not even in the sandbox's PID namespace.
    code = (f"import os, signal\nres = []\ntry:\n    os.kill({os.getpid()}, signal.SIGTERM)\n"
            "    res.append('signalled')\nexcept OSError as e:\n    res.append(type(e).__name__)\n"
            f"try:\n    open('/proc/{os.getpid()}/environ', 'rb').read()\n    res.append('read')\n"
            "except OSError as e:\n    res.append(type(e).__name__)\nprint(' '.join(res))")
    result = run_python(code)
    assert result.ok, result.stderr
    assert "signalled" not in result.stdout and "read" not in result.stdout.split()
