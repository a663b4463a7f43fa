"""Run untrusted, model-generated Python code in a throwaway sandbox.

Threat model: the code may loop forever, fork-bomb, allocate without bound, fill the disk or
RAM-backed files, flood its output, signal or read other processes (the trainer, another tool
call), read secrets (environment, home directory, project tree) or talk to the network.

**Fails closed.** Isolation comes from bubblewrap (``bwrap``). Where it is missing or cannot
create namespaces, a call is refused: it comes back as a failed `ToolResult` whose error names
the fix (install bubblewrap). Only ``allow_unsandboxed=True`` runs code without it, and even
then never as root.

Layers of one call:

1. Own process and session; a wall-clock timeout SIGKILLs the whole process group.
2. **A uid of its own** (when the trainer is root, as in most containers). Root ignores
   RLIMIT_NPROC, and a shared uid would share one process budget, so one call's fork bomb would
   break the next call's ``subprocess.run``. Each running call leases a distinct unprivileged
   uid from a pool; it cannot signal the trainer or another call, and once the call ends every
   process left with that uid is killed before the uid is leased again.
3. rlimits, set by a tiny bootstrap inside the sandbox right before it execs the model code:
   CPU seconds, address space (per process), file size, process count (per uid, so per call),
   no core files.
4. **Memory of the call as a whole.** RLIMIT_AS bounds one process; a watchdog thread sums the
   resident memory of each leased uid's processes every 50 ms and kills the call beyond
   ``memory_mb``.
5. **Disk.** Under bwrap every path is read-only except /tmp, a tmpfs of ``disk_mb`` that is
   also the working directory (``main.py`` is bound into it read-only). A call's RAM is
   therefore at most ``memory_mb`` (processes) + ``disk_mb`` (its files).
6. bwrap namespaces: PID, network (a private loopback that reaches nothing), IPC, UTS, mount
   (plus a user namespace when not root); only system directories and the base interpreter
   are bound, read-only. An empty environment.
7. Captured stdout/stderr are read incrementally and capped at ``max_output_bytes`` each: the
   head and the tail are kept (results are usually printed last), the middle is dropped and
   the drop is marked.

Not root (bwrap in a user namespace): layers 2 and 4 are not available, so the process budget
is shared with the user's own processes and memory is bounded per process only.
``allow_unsandboxed=True`` without bwrap: layers 1, 3, 4 and 7, the code sees the host's
filesystem (as the leased uid when root) and network, and may write outside its directory.
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lightning_opd.config import SandboxConfig

__all__ = ["Limits", "ToolResult", "isolation_problem", "refusal", "run_python", "run_python_batch"]

_DEFAULTS = SandboxConfig()  # run_python's defaults are the config's: one default per limit
_INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or set "
    "tools.sandbox.allow_unsandboxed=true to run model code with rlimits only"
)
_NO_BWRAP = "bubblewrap (bwrap) not found"
_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
_SANDBOX_DIR = "/tmp"  # the call's tmpfs, and its working directory, under bwrap
_UID_SLOTS = 256  # concurrent calls per trainer process (more wait for a free uid)
_UID_FIRST = 1_000_000  # leased uids lie above every ordinary account
_MAX_FILE_BYTES = 64 << 20  # RLIMIT_FSIZE
_GRACE_S = 1.0  # how long to drain pipes after the process died or was killed
_WATCH_S = 0.05  # memory watchdog period
_PAGE = os.sysconf("SC_PAGE_SIZE")
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
if os.getuid() == 0 or os.geteuid() == 0:
    sys.exit("sandbox: refusing to run model code as root")
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


@dataclass(frozen=True)
class Limits:
    """What one call may take (the `tools.sandbox` settings, minus the opt-in)."""

    timeout_s: float
    memory_mb: int
    disk_mb: int
    max_processes: int
    max_output_bytes: int

    def check(self) -> None:
        if not self.timeout_s > 0 or self.memory_mb <= 0 or self.disk_mb <= 0:
            raise ValueError("timeout_s, memory_mb and disk_mb must be positive")
        if self.max_processes < 1 or self.max_output_bytes < 0:
            raise ValueError("max_processes must be >= 1 and max_output_bytes >= 0")


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
    """Whether an unprivileged uid could reach ``path`` (every component o+x)."""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in (real, *real.parents))


# --- one uid per call (root only) --------------------------------------------------------------


def _uids_of_processes() -> Iterator[tuple[int, int, int]]:
    """(pid, real uid, resident bytes) of every process that can be read now."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as fh:
                status = fh.read()
        except OSError:  # gone meanwhile
            continue
        uid, rss = -1, 0
        for line in status.splitlines():
            if line.startswith(b"Uid:"):
                uid = int(line.split()[1])
            elif line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) << 10  # kB
        yield int(name), uid, rss


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` until none is left (a bomb may fork while we scan)."""
    for _ in range(100):
        pids = [pid for pid, owner, _ in _uids_of_processes() if owner == uid]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


class _UidPool:
    """Distinct unprivileged uids for concurrent calls; a uid is leased again only after every
    process left with it has been killed. The range depends on the trainer's pid, so two
    trainers on one machine (almost surely) lease different uids."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pid = -1
        self._free: list[int] = []
        self._over_memory: set[int] = set()
        self._limits: dict[int, int] = {}  # leased uid -> memory limit in bytes
        self._watcher: threading.Thread | None = None

    def _reset_after_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            first = _UID_FIRST + (self._pid % 4096) * _UID_SLOTS
            self._free = list(range(first + _UID_SLOTS - 1, first - 1, -1))
            self._limits, self._over_memory, self._watcher = {}, set(), None

    @contextlib.contextmanager
    def lease(self, memory_bytes: int) -> Iterator[int]:
        with self._cond:
            self._reset_after_fork()
            while not self._free:
                self._cond.wait()
            uid = self._free.pop()
            self._limits[uid] = memory_bytes
            self._over_memory.discard(uid)
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="sandbox-memory")
                self._watcher.start()
        try:
            yield uid
        finally:
            _kill_uid(uid)
            with self._cond:
                self._limits.pop(uid, None)
                self._free.append(uid)
                self._cond.notify()

    def exceeded_memory(self, uid: int) -> bool:
        with self._cond:
            return uid in self._over_memory

    def _watch(self) -> None:
        """Sum resident memory per leased uid; kill the calls that are over their limit."""
        while True:
            with self._cond:
                if not self._limits:
                    self._watcher = None
                    return
                limits = dict(self._limits)
            used = dict.fromkeys(limits, 0)
            for _, uid, rss in _uids_of_processes():
                if uid in used:
                    used[uid] += rss
            for uid, total in used.items():
                if total > limits[uid]:
                    with self._cond:
                        self._over_memory.add(uid)
                    _kill_uid(uid)
            time.sleep(_WATCH_S)


_uid_pool = _UidPool()


@contextlib.contextmanager
def _call_uid(isolated: bool, memory_bytes: int) -> Iterator[int | None]:
    """The uid the call runs as: None keeps ours (not root), else a leased uid."""
    if os.geteuid() != 0:
        yield None
        return
    if not isolated and not _world_traversable(sys.base_prefix):
        # Without bwrap the host's interpreter path must be reachable by the leased uid.
        raise _Refused(
            f"refusing to run model code as root: bubblewrap is unusable and the interpreter "
            f"({sys.base_prefix}) is not reachable by an unprivileged uid; {_INSTALL_HINT}"
        )
    with _uid_pool.lease(memory_bytes) as uid:
        yield uid


class _Refused(Exception):
    """A call that must not run; its message becomes the ToolResult's error."""


# --- the process ---------------------------------------------------------------------------------


def _bwrap_argv(bwrap: str, workdir: str, disk_bytes: int) -> list[str]:
    if os.geteuid() == 0:
        # A user namespace would map the sandbox to real uid 0, which RLIMIT_NPROC ignores;
        # instead bwrap runs privileged and the bootstrap drops to the call's own uid.
        namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                      "--unshare-cgroup-try"]
    else:
        namespaces = ["--unshare-all"]  # includes the user namespace
    argv = [bwrap, *namespaces, "--die-with-parent", "--new-session", "--proc", "/proc",
            "--dev", "/dev"]
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
        # bwrap would create the missing parents (e.g. /root) mode 0700, unreachable by the uid.
        for parent in reversed(Path(prefix).parents[:-1]):
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", prefix, prefix]
        bound.append(prefix)
    # The one writable place: a sized tmpfs (RAM-backed, so it counts against disk_mb, not the
    # host's /tmp), with the code bound into it read-only.
    argv += ["--size", str(disk_bytes), "--perms", "1777", "--tmpfs", _SANDBOX_DIR,
             "--ro-bind", os.path.join(workdir, "main.py"), f"{_SANDBOX_DIR}/main.py"]
    return [*argv, "--chdir", _SANDBOX_DIR]


class _CappedBuffer:
    """Keeps the first and the last ``cap // 2`` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        cap = max(cap, 0)
        self.head_cap, self.tail_cap = cap - cap // 2, cap // 2
        self.head, self.tail, self.dropped = bytearray(), bytearray(), 0

    def feed(self, chunk: bytes) -> None:
        room = max(self.head_cap - len(self.head), 0)
        self.head += chunk[:room]
        self.tail += chunk[room:]
        if len(self.tail) > self.tail_cap:
            excess = len(self.tail) - self.tail_cap
            self.dropped += excess
            del self.tail[:excess]

    def text(self) -> str:
        head = self.head.decode("utf-8", errors="replace")
        tail = self.tail.decode("utf-8", errors="replace")
        if not self.dropped:
            return head + tail
        return f"{head}\n...[truncated {self.dropped} bytes]...\n{tail}"


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


def _execute(code: str, bwrap: str | None, limits: Limits) -> ToolResult:
    if not isinstance(code, str):
        raise TypeError(f"code must be str, not {type(code).__name__}")
    limits.check()
    workdir = tempfile.mkdtemp(prefix="opd-sandbox-")
    try:
        main = os.path.join(workdir, "main.py")
        with open(main, "w", encoding="utf-8") as fh:
            fh.write(code)
        os.chmod(main, 0o644)
        with _call_uid(bwrap is not None, limits.memory_mb << 20) as uid:
            if uid is not None and bwrap is None:
                os.chown(workdir, uid, uid)  # unsandboxed: the host directory is its workdir
            return _spawn(bwrap, workdir, uid, limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _spawn(bwrap: str | None, workdir: str, uid: int | None, limits: Limits) -> ToolResult:
    # CPU time is per process (the wall clock is the real bound); NPROC counts per uid.
    rlimits = {"CPU": math.ceil(limits.timeout_s) + 1, "AS": limits.memory_mb << 20, "CORE": 0,
               "FSIZE": _MAX_FILE_BYTES, "NPROC": limits.max_processes}
    argv = [_interpreter(), "-I", "-B", "-c", _BOOTSTRAP, str(-1 if uid is None else uid)]
    argv += [f"RLIMIT_{name}={value}" for name, value in rlimits.items()]
    if bwrap is not None:
        argv = _bwrap_argv(bwrap, workdir, limits.disk_mb << 20) + argv
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        bufsize=0, env=dict(_ENV), cwd=workdir if bwrap is None else "/",
        start_new_session=True,
    )
    with proc:
        try:
            stdout, stderr, timed_out = _communicate(proc, limits.timeout_s,
                                                     limits.max_output_bytes)
        finally:  # kill strays (or everything, on an error) before reaping frees the pgid
            _kill_group(proc.pid)
            proc.wait()
    rc = proc.returncode
    if uid is not None and _uid_pool.exceeded_memory(uid):
        error: str | None = f"killed: the call's processes exceeded {limits.memory_mb} MB"
    elif timed_out:
        error = f"timed out after {limits.timeout_s:g} s"
    elif rc < 0:  # e.g. SIGXCPU from the CPU rlimit
        error = f"killed by signal {-rc} ({signal.strsignal(-rc)})"
    else:
        error = f"exited with code {rc}" if rc else None
    return ToolResult(stdout, stderr, ok=error is None, timed_out=timed_out, error=error)


# --- entry points ------------------------------------------------------------------------------

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
            trial = _execute("pass", bwrap, Limits(timeout_s=30.0, memory_mb=512, disk_mb=1,
                                                   max_processes=_DEFAULTS.max_processes,
                                                   max_output_bytes=4096))
            _probe_cache[bwrap] = None if trial.ok else (
                f"bubblewrap ({bwrap}) cannot create a sandbox here ({trial.error}): "
                f"{trial.stderr.strip()[-500:]}"
            )
        problem = _probe_cache[bwrap]
    return (None, problem) if problem else (bwrap, None)


def isolation_problem() -> str | None:
    """None if runs get bubblewrap isolation on this machine, else why not."""
    return _usable_bwrap()[1]


def refusal(allow_unsandboxed: bool) -> str | None:
    """Why every tool call would be refused here (with the fix), or None if calls can run.
    Training checks this before it starts, so a missing bubblewrap stops a run at once."""
    problem = isolation_problem()
    if problem is None or allow_unsandboxed:
        return None
    return f"tool calls are refused, no isolation: {problem}; {_INSTALL_HINT}"


def run_python(code: str, *, timeout_s: float = _DEFAULTS.timeout_s, memory_mb: int = _DEFAULTS.memory_mb,
               disk_mb: int = _DEFAULTS.disk_mb, max_processes: int = _DEFAULTS.max_processes,
               max_output_bytes: int = _DEFAULTS.max_output_bytes,
               allow_unsandboxed: bool = _DEFAULTS.allow_unsandboxed) -> ToolResult:
    """Run ``code`` as a script in a fresh sandbox (limits: see the module docstring and
    `SandboxConfig`). Never raises: failures, refusals included, come back as ``ok=False``
    with ``error`` set."""
    global _warned
    limits = Limits(timeout_s, memory_mb, disk_mb, max_processes, max_output_bytes)
    try:
        bwrap, problem = _usable_bwrap()
        if problem is not None:
            if not allow_unsandboxed:
                return _failure(f"tool calls are refused, no isolation: {problem}; {_INSTALL_HINT}")
            with _warn_lock:
                if not _warned:
                    _warned = True
                    warnings.warn(
                        f"UNSANDBOXED model code (allow_unsandboxed=true): {problem}. Running "
                        "with rlimits only; the code can read your files and reach the network.",
                        RuntimeWarning, stacklevel=2,
                    )
        return _execute(code, bwrap, limits)
    except _Refused as refused:
        return _failure(str(refused))
    except Exception as exc:  # the caller is a rollout loop: report, never crash it
        return _failure(f"sandbox failure: {type(exc).__name__}: {exc}")


def run_python_batch(codes: list[str], *, max_workers: int = 8, **kwargs) -> list[ToolResult]:
    """``run_python`` over ``codes`` concurrently (threads; each run is its own process and,
    as root, its own uid). Keyword arguments go to `run_python`."""
    if not codes:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(codes)))) as pool:
        return list(pool.map(lambda code: run_python(code, **kwargs), codes))
