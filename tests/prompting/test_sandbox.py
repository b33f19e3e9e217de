"""Hostile programs are stopped or refused, and the caller carries on."""
import os
import time

import pytest

from llmkit.prompting.sandbox import namespaces_available, run_python


def test_ordinary_program_runs_and_prints():
    r = run_python("import math\nprint(math.factorial(5))\nopen('out.txt','w').write('x')\nprint(open('out.txt').read())")
    assert r.ok and r.stdout.split() == ["120", "x"], r.stderr


def test_infinite_loop_is_killed_in_time():
    t = time.perf_counter()
    r = run_python("while True:\n    pass\n", timeout=1.5)
    assert r.status in ("timeout", "killed") and time.perf_counter() - t < 6


def test_fork_bomb_is_refused():
    r = run_python("import os\nwhile True:\n    os.fork()\n", timeout=3)
    assert not r.ok and "not allowed" in r.stderr
    r = run_python("import subprocess\nsubprocess.run(['sh','-c',':(){ :|:& };:'])\n", timeout=3)
    assert not r.ok and "not allowed" in r.stderr
    r = run_python("import multiprocessing as mp\nmp.Process(target=print).start()\n", timeout=3)
    assert not r.ok


def test_memory_blowup_is_stopped():
    r = run_python("x = bytearray(4 << 30)\nprint('allocated')\n", memory_mb=256, timeout=10)
    assert r.status == "killed" and "allocated" not in r.stdout


def test_network_is_refused():
    r = run_python("import socket\ns = socket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('connected')\n")
    assert not r.ok and "connected" not in r.stdout
    r = run_python("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=2)\n")
    assert not r.ok


def test_writes_and_deletes_outside_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"open({str(victim)!r}, 'w').write('pwned')", f"import os\nos.remove({str(victim)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})", f"import os\nos.rename({str(victim)!r}, 'x')",
                 f"import os\nfd = os.open({str(victim)!r}, os.O_WRONLY)\nos.write(fd, b'pwned')",
                 f"import pathlib\npathlib.Path({str(tmp_path / 'new.txt')!r}).write_text('x')"):
        r = run_python(code)
        assert not r.ok and "not allowed" in r.stderr, (code, r.stderr)
    assert victim.read_text() == "keep me" and not (tmp_path / "new.txt").exists()


def test_environment_secrets_do_not_leak(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    r = run_python("import os\nprint(os.environ.get('OPENAI_API_KEY'))\n"
                   "print(sorted(k for k in os.environ))\n")
    assert r.ok and "sk-secret-123" not in r.stdout
    r = run_python(f"print(open('/proc/{os.getpid()}/environ').read())")
    assert not r.ok and "sk-secret-123" not in r.stdout
    r = run_python("import ctypes\nctypes.CDLL(None).system(b'echo hi')\n")
    assert not r.ok and "hi" not in r.stdout


def test_harness_carries_on_after_hostile_programs():
    results = [run_python(c, timeout=1.5, memory_mb=256) for c in
               ("while True: pass", "x = ' ' * (2 << 30)", "import os; os.fork()", "print('fine')")]
    assert [r.ok for r in results] == [False, False, False, True]


@pytest.mark.skipif(not namespaces_available(), reason="no unprivileged user namespaces here")
def test_network_namespace_has_no_route_even_without_the_hook():
    # the hook refuses socket creation; this checks the namespace layer alone through a raw interface listing
    r = run_python("print(open('/proc/net/dev').read())")
    ifaces = {line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line}
    assert r.ok and ifaces == {"lo"}
