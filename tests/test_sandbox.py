"""The sandbox that runs model-written code (`kiln.rewards.sandbox`), attacked the ways a policy could:
loop forever, allocate 10 GB, fork repeatedly, print 1 GB, open sockets, read the home directory
and the environment, delete files. Each ends in a failed run with its reason, quickly, and leaves
nothing changed outside the sandbox's own (removed) directory. Bounded: 10 GB is asked for under
a 128 MB limit, 1 GB of output stops at a 64 kB cap."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from kiln.config import SandboxConfig
from kiln.rewards.sandbox import describe_isolation, run_python

LIMITS = SandboxConfig(timeout_s=2.0, memory_mb=128, max_output_bytes=65536, max_procs=16)


def sandbox_processes(work_marker: str = "kiln-sandbox-") -> list[int]:
    """Processes still running the sandbox bootstrap (their command line names its directory)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if work_marker.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                continue
    return found


def test_a_plain_program_runs_and_its_directory_is_removed():
    r = run_python("import json, doctest\nopen('scratch.txt', 'w').write('x')\nprint(json.dumps([1, 2]))", LIMITS)
    assert r.ok and r.stdout.strip() == "[1, 2]"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("kiln-sandbox-*"))


def test_a_program_that_loops_forever_is_stopped_at_the_time_limit():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass\n", SandboxConfig(timeout_s=1.0))
    assert r.reason == "timeout" and not r.ok
    assert time.perf_counter() - t0 < 6


def test_asking_for_10_gb_fails_with_a_memory_error():
    r = run_python("blob = bytearray(10 * 2**30)\nprint('allocated')", LIMITS)
    assert r.reason == "memory"
    assert "allocated" not in r.stdout


def test_a_fork_bomb_hits_the_process_limit_and_leaves_no_process_behind():
    r = run_python("import os\nwhile True:\n    os.fork()\n", LIMITS)
    assert r.reason in ("process_limit", "timeout"), r.stderr[-300:]
    time.sleep(0.5)
    assert sandbox_processes() == []


def test_a_detached_sleeper_dies_with_the_sandbox():
    """setsid() leaves the process group the parent kills; the PID namespace takes it anyway."""
    r = run_python("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(600)\ntime.sleep(600)\n",
                   SandboxConfig(timeout_s=1.0))
    assert r.reason == "timeout"
    time.sleep(0.5)
    if not r.isolation.get("pid_namespace"):
        pytest.skip("no PID namespace on this machine: " + describe_isolation(LIMITS))
    assert sandbox_processes() == []


def test_printing_1_gb_stops_at_the_output_cap():
    t0 = time.perf_counter()
    r = run_python("import sys\nfor _ in range(2**14):\n    sys.stdout.write('x' * 2**16)\n", LIMITS)
    assert r.reason == "output_limit"
    assert len(r.stdout) + len(r.stderr) <= 2 * LIMITS.max_output_bytes
    assert time.perf_counter() - t0 < 6


def test_no_connection_leaves_the_sandbox():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    got: list[bytes] = []

    def accept():
        try:
            conn, _ = server.accept()
            got.append(conn.recv(100))
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "s.sendall(b'secret')\nprint('sent')", LIMITS)
    server.close()
    t.join()
    if not r.isolation.get("network"):
        pytest.skip("no network namespace on this machine: " + describe_isolation(LIMITS))
    assert r.reason == "error" and "sent" not in r.stdout
    assert got == []


def test_home_directory_and_environment_secrets_are_out_of_reach(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_key").write_text("PRIVATE-KEY-MATERIAL")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KILN_TEST_API_TOKEN", "tok-123-secret")
    r = run_python(
        "import os\nprint(sorted(os.environ))\nprint(os.environ.get('KILN_TEST_API_TOKEN'))\n"
        f"print(open({str(home / '.ssh' / 'id_key')!r}).read())\n", LIMITS)
    assert "tok-123-secret" not in r.stdout and "KILN_TEST_API_TOKEN" not in r.stdout
    assert "PRIVATE-KEY-MATERIAL" not in r.stdout
    # refused: hidden (a tmpfs over the home) or unreadable (the sandbox runs as nobody)
    assert r.reason == "error" and ("FileNotFoundError" in r.stderr or "PermissionError" in r.stderr)


def test_files_outside_the_sandbox_cannot_be_deleted_or_written(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.txt").write_text("keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = run_python(
        "import os, shutil\n"
        f"for attempt in (lambda: os.remove({str(precious / 'data.txt')!r}), lambda: shutil.rmtree({str(precious)!r}),\n"
        f"                lambda: open({str(tmp_path / 'planted.txt')!r}, 'w').write('x')):\n"
        "    try:\n        attempt()\n        print('changed')\n    except OSError as e:\n        print('refused', e.errno)\n",
        LIMITS)
    assert r.ok and "changed" not in r.stdout and r.stdout.count("refused") == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (precious / "data.txt").read_text() == "keep me"


def test_the_isolation_line_names_every_protection():
    line = describe_isolation(LIMITS)
    for word in ("network", "filesystem", "PID namespace", "user:"):
        assert word in line
