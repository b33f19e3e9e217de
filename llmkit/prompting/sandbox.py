"""Run untrusted model-written Python in a separate, limited process (survey §6.3.2 PAL, §6.4 tools, §7.1.1 code).

Implements `run_python(code, timeout=..., memory_mb=...) -> SandboxResult`, used by HumanEval scoring,
program-aided reasoning and the ReAct Python tool. Layers, outermost first:
1. a fresh interpreter (`python -I`: no user site, no PYTHON* variables) in its own session, with a SCRUBBED
   environment (only PATH/LANG/HOME=<tmp>; API keys and tokens of the parent never reach it), cwd = a new
   temporary directory that is deleted afterwards;
2. when the kernel allows unprivileged user namespaces, `unshare --user --net --pid --fork --kill-child`:
   no network interface but a down loopback, and killing the namespace's first process kills every process
   inside it (the fork-bomb backstop);
3. rlimits: CPU seconds, address space (memory), largest file written, open files, core dumps off;
4. a wall-clock timeout that kills the whole process group;
5. an audit hook (PEP 578) installed before the code runs that refuses: sockets (create/connect/bind/DNS),
   process creation (fork, exec, spawn, system, subprocess), ctypes (which could bypass everything here),
   writes/deletes/renames/chmods outside the temporary directory, and reading /proc/*/environ.

What it does NOT cover (state it, per DESIGN.md): C extensions already imported and native code can make raw
syscalls the audit hook never sees (no seccomp filter); without user namespaces there is no network
isolation beyond the hook and no pid-namespace kill; reads of world-readable files outside the directory are
allowed (secrets there are the host's business); CPU time of a multi-threaded numpy call counts against
RLIMIT_CPU, not wall time; a process running as root ignores RLIMIT_NPROC, hence the hook + pid namespace.
"""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# The hook runs inside the child before the user's code; kept as source so the child imports nothing of ours.
_BOOTSTRAP = r'''
import os, sys
ROOT = os.path.realpath(os.getcwd())
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_DENY = ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
         "socket.gethostbyname", "socket.gethostbyaddr", "os.fork", "os.forkpty", "os.posix_spawn", "os.exec",
         "os.spawn", "os.system", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym",
         "ctypes.addressof", "os.kill", "os.killpg", "signal.pthread_kill", "sys.addaudithook")
_PATH_EVENTS = {"os.remove": 0, "os.rmdir": 0, "os.rename": (0, 1), "os.mkdir": 0, "os.chmod": 0, "os.chown": 0,
                "os.symlink": (0, 1), "os.link": (0, 1), "os.truncate": 0, "os.utime": 0, "shutil.rmtree": 0,
                "shutil.copyfile": 1, "shutil.move": (0, 1)}
def _inside(path, dir_fd=None):
    if isinstance(path, int):
        path = os.readlink(f"/proc/self/fd/{path}")
    path = os.fsdecode(path)
    if dir_fd not in (None, -1) and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    p = os.path.realpath(path)
    return p == ROOT or p.startswith(ROOT + os.sep)
def _hook(event, args):
    if event in _DENY:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        if path is None:
            return
        if isinstance(path, (str, bytes)) and "environ" in os.fsdecode(path) and os.fsdecode(path).startswith("/proc"):
            raise PermissionError("sandbox: reading process environments is not allowed")
        writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
    elif event in _PATH_EVENTS:
        idx = _PATH_EVENTS[event]
        dir_fd = args[-1] if event in ("os.remove", "os.rmdir", "os.mkdir") and isinstance(args[-1], int) else None
        for i in (idx if isinstance(idx, tuple) else (idx,)):
            if i < len(args) and isinstance(args[i], (str, bytes, int)) and not _inside(args[i], dir_fd):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory is not allowed")
sys.addaudithook(_hook)
del _hook
__file__ = "main.py"
_src = open("main.py").read()
_g = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(_src, "main.py", "exec"), _g)
'''


@dataclass
class SandboxResult:
    status: str  # "ok", "error" (non-zero exit / exception), "timeout", "killed" (signal, e.g. memory/CPU limit)
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=1)
def namespaces_available() -> bool:
    """True when `unshare` can create user+net+pid namespaces here (containers often forbid it)."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        r = subprocess.run([exe, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child", "true"],
                           capture_output=True, timeout=10)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _limits(cpu_s: int, memory_mb: int, file_mb: int):
    def apply():
        os.setsid()  # own process group: the timeout kills it whole
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # bites for non-root users only
    return apply


def run_python(code: str, *, timeout: float = 5.0, memory_mb: int = 1024, file_mb: int = 16, stdin: str = "",
               isolate_network: bool = True, max_output: int = 1 << 16) -> SandboxResult:
    """Run `code` as a script in a fresh limited interpreter; never raises for anything the code does."""
    with tempfile.TemporaryDirectory(prefix="llmkit-sandbox-") as tmp:
        with open(os.path.join(tmp, "main.py"), "w") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-I", "-c", _BOOTSTRAP]
        if isolate_network and namespaces_available():
            cmd = [shutil.which("unshare"), "--user", "--map-root-user", "--net", "--pid", "--fork",
                   "--kill-child"] + cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace",
                                preexec_fn=_limits(int(timeout) + 1, memory_mb, file_mb))
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
            status = "ok" if proc.returncode == 0 else ("killed" if proc.returncode < 0 else "error")
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            status = "timeout"
        if status == "error" and "MemoryError" in err:
            status = "killed"
        return SandboxResult(status, proc.returncode, out[:max_output], err[-max_output:], time.perf_counter() - t0)
