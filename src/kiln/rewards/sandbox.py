"""Running model-written code: a separate process with limits, for verifiable rewards (`kiln rl`).

`run_python(code, limits)` writes the program into a fresh private directory and runs it under
a small bootstrap (`_BOOT`) that, before the program's first line:

- enters new namespaces where the kernel allows: network (only a loopback that is down: no
  connection leaves the process), mount and PID (user too when kiln does not run as root);
- makes the whole filesystem read-only except the private directory, hides the home directory
  (an empty tmpfs, with the interpreter's own directories bound back where they live inside it)
  and mounts a /proc that shows only the sandbox's processes;
- drops privileges: to `nobody` when kiln runs as root, else every capability (and no new ones);
- sets RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC (processes), RLIMIT_FSIZE (file size),
  no core dumps, and starts from an environment with no inherited variables (no secrets).

The parent enforces the wall clock and the output cap, killing the whole process group (and,
with a PID namespace, every process the program started) when either runs out. Each result says
why a run failed (`reason`) and which protections were in force (`isolation`); where the kernel
refuses a namespace the run goes ahead without it and `isolation` says so (docs/security.md, "Sandbox").
This is not a boundary against kernel exploits: see docs/security.md for a container setup.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiln.config import SandboxConfig

NOBODY = 65534
SETUP_FAILED = 125  # the bootstrap's exit code when it could not apply a protection it promised

# Runs as `python -I -B -X utf8 -c _BOOT CONFIG_JSON`, with the fd `report_fd` open for its isolation report.
_BOOT = r'''
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
iso = {"network": False, "filesystem": False, "home_hidden": False, "pid_namespace": False, "user": "same",
       "notes": []}
report = os.fdopen(cfg["report_fd"], "w")

def err():
    return os.strerror(ctypes.get_errno())

def mount(src, target, fstype, flags, data=None):
    if libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                  data and data.encode()) != 0:
        raise OSError(f"mount {target}: {err()}")

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]

def set_readonly(path, readonly, recursive):
    attr = MountAttr(1 if readonly else 0, 0 if readonly else 1, 0, 0)
    flags = 0x8000 if recursive else 0  # AT_RECURSIVE
    if libc.syscall(442, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:  # mount_setattr
        raise OSError(f"mount_setattr {path}: {err()}")

def hide(home, keep):
    """An empty read-only tmpfs over `home`, with the directories in `keep` (inside it) bound back."""
    fds = {k: os.open(k, os.O_PATH) for k in keep}
    mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for k, fd in fds.items():
        os.makedirs(k, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", k, None, MS_BIND | MS_REC)
        os.close(fd)

root = os.geteuid() == 0
uid, gid = os.getuid(), os.getgid()
want = NEWNET | NEWNS | NEWPID | (0 if root else NEWUSER)
for flags in (want, want & ~(NEWNS | NEWPID)) if cfg["namespaces"] else ():
    if libc.unshare(flags) == 0:
        break
    iso["notes"].append(f"unshare({'+'.join(n for n, f in (('user', NEWUSER), ('net', NEWNET), ('mount', NEWNS), ('pid', NEWPID)) if flags & f)}): {err()}")
else:
    flags = 0
try:
    if flags & NEWUSER:
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {gid} 1")
    iso["network"] = bool(flags & NEWNET)
    iso["pid_namespace"] = bool(flags & NEWPID)
    if flags & NEWNS:
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount(cfg["dir"], cfg["dir"], None, MS_BIND)
        for home in cfg["hide"]:
            keep = [k for k in cfg["keep"] if k.startswith(home.rstrip("/") + "/")]
            if os.path.isdir(home) and not cfg["dir"].startswith(home.rstrip("/") + "/"):
                hide(home, keep)
                iso["home_hidden"] = True
        set_readonly("/", True, True)
        set_readonly(cfg["dir"], False, False)
        iso["filesystem"] = True
except OSError as e:
    report.write(json.dumps({"setup_failed": str(e)}))
    report.close()
    os._exit(125)

def drop_privileges():
    if root:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        return "nobody"
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:
        raise OSError(f"capset: {err()}")
    return "same, no capabilities"

def limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(kind, (value, value))

def wait_exit(pid):
    status = os.waitpid(pid, 0)[1]
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8

drop = root and (flags & NEWNS or cfg["world_readable"])
iso["user"] = "nobody" if drop else ("same, no capabilities" if flags & NEWUSER else "same")
if root and not drop:
    iso["notes"].append("runs as root: the interpreter is not readable by nobody and no mount namespace makes it so")
report.write(json.dumps(iso))
report.close()
parent = os.getpid()
reaper = os.fork()
if reaper:
    code = wait_exit(reaper)
    os._exit(128 - code if code < 0 else code)
# The reaper: PID 1 of the new namespace when there is one; dies (and with it every process of the
# namespace) when the bootstrap is killed.
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() not in (parent, 0):  # 0: the parent is outside our PID namespace
    os._exit(137)
if flags & NEWPID and flags & NEWNS:
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass
child = os.fork()
if child:
    code = wait_exit(child)
    os._exit(128 - code if code < 0 else code)
os.chdir(cfg["dir"])
if drop or flags & NEWUSER:
    drop_privileges()
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid program gives privileges back
limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_AS, cfg["memory_bytes"])
limit(resource.RLIMIT_CPU, cfg["cpu_s"])
limit(resource.RLIMIT_FSIZE, cfg["file_bytes"])
limit(resource.RLIMIT_NPROC, cfg["procs"])
limit(resource.RLIMIT_NOFILE, 256)
sys.argv = ["main.py"]
sys.path.insert(0, cfg["dir"])
import runpy
runpy.run_path("main.py", run_name="__main__")
'''


@dataclass
class SandboxResult:
    """How a run ended. `reason` is "ok" or why not: timeout, memory, process_limit, output_limit,
    error (an exception or a non-zero exit), killed (by a signal), sandbox_error (a protection
    could not be set up)."""

    reason: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    isolation: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.reason == "ok"


def _world_traversable(path: Path) -> bool:
    """Whether every directory above `path` lets other users through (so `nobody` can run the interpreter)."""
    for p in [path, *path.parents]:
        try:
            if p.is_dir() and not p.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _interpreter_dirs() -> list[str]:
    """Directories the interpreter needs to import anything: its prefixes and every sys.path entry."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)))}
    dirs |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    dirs.discard("/")
    return sorted(d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs))


def _home_dirs() -> list[str]:
    homes = {os.path.realpath(os.path.expanduser("~"))}
    try:
        import pwd

        homes.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError):
        pass
    return sorted(h for h in homes if h != "/" and os.path.isdir(h))


def _classify(code: int, stderr: str) -> str:
    if code == 0:
        return "ok"
    if code == SETUP_FAILED:
        return "sandbox_error"
    if code in (128 + signal.SIGXCPU, -signal.SIGXCPU, 128 + signal.SIGKILL, -signal.SIGKILL) and "Error" not in stderr[-500:]:
        return "timeout" if code in (128 + signal.SIGXCPU, -signal.SIGXCPU) else "killed"
    if "MemoryError" in stderr[-2000:]:
        return "memory"
    if "BlockingIOError" in stderr[-2000:] and "Resource temporarily unavailable" in stderr[-2000:]:
        return "process_limit"
    if code > 128 or code < 0:
        return "killed"
    return "error"


def run_python(code: str, limits: SandboxConfig | None = None, namespaces: bool = True) -> SandboxResult:
    """Run `code` as a Python program in the sandbox; never raises for anything the program does.

    The program's directory is removed afterwards, whatever it wrote there. `namespaces=False`
    leaves out the kernel namespaces (only to measure what they add)."""
    lim = limits or SandboxConfig()
    work = Path(tempfile.mkdtemp(prefix="kiln-sandbox-", dir=lim.tmp_dir or None))
    t0 = time.perf_counter()
    proc = None
    try:
        (work / "main.py").write_text(code)
        (work / "main.py").chmod(0o644)
        root = os.geteuid() == 0
        if root:
            os.chown(work, NOBODY, NOBODY)
        work.chmod(0o700)
        cfg = {
            "dir": str(work), "hide": _home_dirs(), "keep": _interpreter_dirs(), "namespaces": namespaces,
            "memory_bytes": lim.memory_mb << 20, "cpu_s": max(1, int(lim.timeout_s + 0.999)),
            "file_bytes": lim.max_file_mb << 20, "procs": lim.max_procs,
            "world_readable": _world_traversable(Path(sys.executable).resolve().parent)
                              and all(_world_traversable(Path(d)) for d in _interpreter_dirs()),
        }
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"}
        rfd, wfd = os.pipe()
        cfg["report_fd"] = wfd
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOT, json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=env,
                pass_fds=(wfd,), start_new_session=True,
            )
        finally:
            os.close(wfd)
        out, err, why = _collect(proc, lim, t0)
        with os.fdopen(rfd, "r") as f:
            try:
                isolation = json.loads(f.read() or "{}")
            except json.JSONDecodeError:
                isolation = {}
        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        if "setup_failed" in isolation:
            stderr, why = f"sandbox setup failed: {isolation['setup_failed']}", "sandbox_error"
        return SandboxResult(why or _classify(rc, stderr), rc, stdout, stderr, time.perf_counter() - t0, isolation)
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc)
        shutil.rmtree(work, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group; with a PID namespace its reaper takes every other process along."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _collect(proc: subprocess.Popen, lim: SandboxConfig, t0: float) -> tuple[bytes, bytes, str | None]:
    """Read stdout and stderr until the program ends, killing it at the wall clock or the output cap."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    why = None
    deadline = t0 + lim.timeout_s
    try:
        while sel.get_map():
            left = deadline - time.perf_counter()
            if left <= 0:
                why = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = key.fileobj.read(65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                bufs[key.fileobj] += chunk
            if sum(len(b) for b in bufs.values()) > lim.max_output_bytes:
                why = "output_limit"
                break
        if why is None:
            try:
                proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                why = "timeout"
    finally:
        sel.close()
        if why is not None:
            _kill(proc)
        for f in bufs:
            f.close()
    cap = lim.max_output_bytes
    return bytes(bufs[proc.stdout][:cap]), bytes(bufs[proc.stderr][:cap]), why


def describe_isolation(limits: SandboxConfig | None = None) -> str:
    """One line on what the sandbox enforces on this machine (from a run of an empty program),
    naming each protection the kernel refused."""
    lim = limits or SandboxConfig()
    r = run_python("pass", lim)
    if not r.ok:
        return f"cannot run programs ({r.reason}: {r.stderr.strip()[-200:]})"
    iso = r.isolation
    parts = [f"{lim.timeout_s:g} s, {lim.memory_mb} MB, {lim.max_procs} processes, {lim.max_output_bytes:,} bytes of output",
             "no network" if iso.get("network") else "WARNING: network NOT isolated (no network namespace)",
             "read-only filesystem outside its directory" if iso.get("filesystem")
             else "WARNING: filesystem writable (no mount namespace)",
             "home hidden" if iso.get("home_hidden") else "home directory visible",
             "own PID namespace" if iso.get("pid_namespace") else "no PID namespace",
             f"user: {iso.get('user', '?')}"]
    notes = "; ".join(iso.get("notes", []))
    return ", ".join(parts) + (f" ({notes})" if notes else "")
