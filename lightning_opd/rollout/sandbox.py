"""Run untrusted, model-generated Python code in a throwaway sandbox.

Threat model: the code may loop forever, fork-bomb, allocate without bound, flood its output,
read secrets (environment, home directory, project tree) or talk to the network. Layers:

1. Own process and session; a wall-clock timeout SIGKILLs the whole process group.
2. rlimits (CPU seconds, address space, file size, process count, no core files), applied by a
   tiny bootstrap inside the sandbox right before it execs the model code.
3. An empty environment and a fresh temporary working directory, removed afterwards.
4. Captured stdout/stderr are read incrementally and capped (head kept, truncation marked).
5. Where bubblewrap (``bwrap``) works: new PID, network, IPC and UTS namespaces (plus a user
   namespace when not root), a private /tmp, and only system directories and the base
   interpreter bound read-only. As root the code drops to uid ``nobody``: root ignores
   RLIMIT_NPROC, so without the drop nothing would bound a fork bomb (the budget is then
   shared by all sandboxes started by root; with a user namespace it is per sandbox).

Without a working bwrap only layers 1-4 remain (loudly warned): the code then sees the host
filesystem and network, and a child that calls setsid() escapes the group kill (RLIMIT_CPU
still ends it if it spins). ``require_isolation=True`` refuses to run instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ToolResult", "isolation_problem", "run_python", "run_python_batch"]

_NO_BWRAP = (
    "bubblewrap (bwrap) not found; install the Debian package bubblewrap "
    "or set tools.sandbox.require_isolation=false"
)
_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
_SANDBOX_DIR = "/work_sandbox"  # where the temp working dir appears under bwrap
_NOBODY = 65534  # uid and gid (nobody / nogroup) that root drops to
_MAX_PROCS = 64  # RLIMIT_NPROC: enough for multiprocessing, too few to hurt the host
_MAX_FILE_BYTES = 64 << 20  # RLIMIT_FSIZE
_GRACE_S = 1.0  # how long to drain pipes after the process died or was killed
# Read-only system paths Python needs; symlinks (merged /usr) are recreated as symlinks.
_SYSTEM_PATHS = (
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/alternatives",
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
)

# Runs inside the sandbox with the base interpreter: drop root, set limits, exec the model code.
# Dropping before setrlimit keeps the setuid() process-count check on root's generous limit.
_BOOTSTRAP = """\
import os, resource, sys
uid = int(sys.argv[1])
if uid >= 0 and os.getuid() == 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
for spec in sys.argv[2:]:
    name, value = spec.split("=")
    res, limit = getattr(resource, name), int(value)
    hard = resource.getrlimit(res)[1]
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(res, (limit, limit))
os.environ.pop("PWD", None)  # exported by bwrap's --chdir
os.execv(sys.executable, [sys.executable, "-I", "-B", "main.py"])
"""


@dataclass(frozen=True)
class ToolResult:
    """Outcome of one sandboxed run; ``ok`` iff exit code 0 and not timed out."""

    stdout: str
    stderr: str
    ok: bool
    timed_out: bool
    error: str | None = None


def _failure(error: str) -> ToolResult:
    return ToolResult(stdout="", stderr="", ok=False, timed_out=False, error=error)


def _find_bwrap() -> str | None:
    """Module-level lookup so tests (and callers) can pretend bwrap is missing."""
    return shutil.which("bwrap")


def _interpreter() -> str:
    """The *base* interpreter: a venv's python would expose the project tree to the sandbox."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for name in (f"python{version}", "python3", "python"):
        candidate = os.path.join(sys.base_prefix, "bin", name)
        if os.access(candidate, os.X_OK):
            return candidate
    return os.path.realpath(sys.executable)


def _world_traversable(path: str) -> bool:
    """Whether uid nobody could reach ``path`` (every component o+x)."""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (real, *real.parents))


def _sandbox_uid(isolated: bool) -> int | None:
    """uid the code should run as, or None to keep ours (only root can and must drop)."""
    if os.geteuid() != 0:
        return None
    # bwrap binds the interpreter into a world-readable tree; without it the host path must do.
    return _NOBODY if isolated or _world_traversable(sys.base_prefix) else None


def _bwrap_argv(bwrap: str, workdir: str) -> list[str]:
    if os.geteuid() == 0:
        # A user namespace would map the sandbox to real uid 0, which RLIMIT_NPROC ignores;
        # instead bwrap runs privileged and the bootstrap drops to a real unprivileged uid.
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try"]
    else:
        namespaces = ["--unshare-all"]  # includes the user namespace
    argv = [bwrap, *namespaces, "--die-with-parent", "--new-session", "--proc", "/proc",
            "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    bound = []
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            argv += ["--ro-bind", path, path]
            bound.append(path)
    prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
    for prefix in sorted(prefixes):
        if any(prefix == b or prefix.startswith(b + "/") for b in bound):
            continue
        # bwrap would create the missing parents (e.g. /root) mode 0700, unreadable for nobody.
        for parent in reversed(Path(prefix).parents[:-1]):
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", prefix, prefix]
        bound.append(prefix)
    return [*argv, "--bind", workdir, _SANDBOX_DIR, "--chdir", _SANDBOX_DIR]


class _CappedBuffer:
    """Keeps the first ``cap`` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.cap, self.head, self.dropped = max(cap, 0), bytearray(), 0

    def feed(self, chunk: bytes) -> None:
        room = max(self.cap - len(self.head), 0)
        self.head += chunk[:room]
        self.dropped += max(len(chunk) - room, 0)

    def text(self) -> str:
        text = self.head.decode("utf-8", errors="replace")
        return f"{text}\n...[truncated {self.dropped} bytes]" if self.dropped else text


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the zombie in place, so its pid (= our pgid) cannot be reused before the
    # group kill below.
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _communicate(proc: subprocess.Popen, timeout_s: float, cap: int) -> tuple[str, str, bool]:
    """Drain both pipes with a deadline; kill the group on timeout or once the main process exits
    (so stray children holding the pipes cannot stall us). Returns stdout, stderr, timed_out."""
    out, err = _CappedBuffer(cap), _CappedBuffer(cap)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    try:  # a pidfd turns readable when the process exits, so no polling is needed
        pidfd: int | None = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ, None)
    except (AttributeError, OSError):  # Python < 3.9 or Linux < 5.3
        pidfd = None
    poll_s = math.inf if pidfd is not None else 0.05
    deadline, timed_out, exited, pipes = time.monotonic() + timeout_s, False, False, 2
    try:
        while True:
            if not exited and _has_exited(proc.pid):
                exited = True
                _kill_group(proc.pid)
                deadline = min(deadline, time.monotonic() + _GRACE_S)
            if exited and pipes == 0:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if exited or timed_out:
                    break  # something still holds the pipes; give up on it
                timed_out = True
                _kill_group(proc.pid)
                deadline = time.monotonic() + _GRACE_S
                continue
            for key, _ in sel.select(min(remaining, poll_s)):
                if key.data is None:  # pidfd fired; _has_exited() handles it next round
                    sel.unregister(key.fileobj)
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    key.data.feed(chunk)
                else:
                    sel.unregister(key.fileobj)
                    pipes -= 1
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    return out.text(), err.text(), timed_out


def _execute(code: str, bwrap: str | None, timeout_s: float, memory_mb: int,
             cap: int) -> ToolResult:
    if not isinstance(code, str):
        raise TypeError(f"code must be str, not {type(code).__name__}")
    if not timeout_s > 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    workdir = tempfile.mkdtemp(prefix="opd-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        uid = _sandbox_uid(isolated=bwrap is not None)
        if uid is not None:
            os.chown(workdir, uid, uid)
        # CPU time is per process (the wall clock is the real bound); NPROC counts per uid.
        limits = {"CPU": math.ceil(timeout_s) + 1, "AS": int(memory_mb) << 20, "CORE": 0,
                  "FSIZE": _MAX_FILE_BYTES, "NPROC": _MAX_PROCS}
        argv = [_interpreter(), "-I", "-B", "-c", _BOOTSTRAP, str(-1 if uid is None else uid)]
        argv += [f"RLIMIT_{name}={value}" for name, value in limits.items()]
        if bwrap is not None:
            argv = _bwrap_argv(bwrap, workdir) + argv
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            bufsize=0, env=dict(_ENV), cwd=workdir if bwrap is None else "/",
            start_new_session=True,
        )
        with proc:
            try:
                stdout, stderr, timed_out = _communicate(proc, timeout_s, cap)
            finally:  # kill strays (or everything, on an error) before reaping frees the pgid
                _kill_group(proc.pid)
                proc.wait()
        rc = proc.returncode
        if timed_out:
            error: str | None = f"timed out after {timeout_s:g} s"
        elif rc < 0:  # e.g. SIGXCPU from the CPU rlimit
            error = f"killed by signal {-rc} ({signal.strsignal(-rc)})"
        else:
            error = f"exited with code {rc}" if rc else None
        return ToolResult(stdout, stderr, ok=rc == 0 and not timed_out, timed_out=timed_out,
                          error=error)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_probe_lock = threading.Lock()
_probe_cache: dict[str, str | None] = {}  # bwrap path -> None, or why it cannot sandbox
_warn_lock, _warned = threading.Lock(), False


def _usable_bwrap() -> tuple[str | None, str | None]:
    """(bwrap path, None) if a sandbox can really be created here, else (None, reason)."""
    bwrap = _find_bwrap()
    if bwrap is None:
        return None, _NO_BWRAP
    with _probe_lock:  # one trial run per binary: kernels or containers may forbid namespaces
        if bwrap not in _probe_cache:
            trial = _execute("pass", bwrap, timeout_s=30.0, memory_mb=512, cap=4096)
            _probe_cache[bwrap] = None if trial.ok else (
                f"bubblewrap ({bwrap}) cannot create a sandbox here ({trial.error}): "
                f"{trial.stderr.strip()[-500:]}"
            )
        problem = _probe_cache[bwrap]
    return (None, problem) if problem else (bwrap, None)


def isolation_problem() -> str | None:
    """None if runs get bubblewrap isolation on this machine, else why not."""
    return _usable_bwrap()[1]


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
               max_output_bytes: int = 65536, require_isolation: bool = False) -> ToolResult:
    """Run ``code`` as a script in a fresh sandbox. Never raises: failures come back as
    ``ok=False`` with ``error`` set."""
    global _warned
    try:
        bwrap, problem = _usable_bwrap()
        if problem is not None:
            if require_isolation:
                return _failure(problem)
            with _warn_lock:
                if not _warned:
                    _warned = True
                    warnings.warn(
                        f"UNSANDBOXED model code: {problem}. Running with rlimits only; the code "
                        "can read your files and reach the network.",
                        RuntimeWarning, stacklevel=2,
                    )
        return _execute(code, bwrap, timeout_s, memory_mb, max_output_bytes)
    except Exception as exc:  # the caller is a rollout loop: report, never crash it
        return _failure(f"sandbox failure: {type(exc).__name__}: {exc}")


def run_python_batch(codes: list[str], *, max_workers: int = 8, **kwargs) -> list[ToolResult]:
    """``run_python`` over ``codes`` concurrently (threads; each run is its own process)."""
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(codes)))) as pool:
        return list(pool.map(lambda code: run_python(code, **kwargs), codes))
