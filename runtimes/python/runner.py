"""thaw's warm Python runner (docs/runner-protocol.md).

Started as the template's START process before the snapshot: the
interpreter is up and the common modules are imported. It waits on a Unix
socket for exactly one job, then runs the code as ``__main__`` with the
semantics of ``python3 -c CODE ARGS...``: ``sys.argv == ['-c', *ARGS]``,
``SystemExit`` codes, a traceback on stderr and exit status 1 on an uncaught
exception, stdin readable to EOF, output on the runner's own stdout/stderr.
"""

import atexit
import builtins
import gc
import json
import os
import socket
import sys
import types

# The imports a job would otherwise pay for, done before the snapshot.
import collections  # noqa: F401
import datetime  # noqa: F401
import functools  # noqa: F401
import itertools  # noqa: F401
import math  # noqa: F401
import random
import re  # noqa: F401
import subprocess  # noqa: F401
import traceback

SOCKET = os.environ.get("THAW_RUNNER_SOCKET", "/run/thaw-runner/runner.sock")

# Tests set this to play a snapshot: the generator state is fixed at import,
# as it would be in every restore of one snapshot.
if os.environ.get("THAW_RUNNER_SEED_AT_IMPORT") is not None:
    random.seed(int(os.environ["THAW_RUNNER_SEED_AT_IMPORT"]))


def reseed():
    """Every restore of a snapshot starts from the same generator state:
    re-seed what was seeded at import from fresh entropy (the kernel pool is
    re-seeded by envd's /init). The interpreter's hash seed cannot change
    once it runs; see runtimes/README.md."""
    random.seed(os.urandom(32))
    extra = sys.modules.get("thaw_runner_reseed")
    if extra is not None:
        extra.reseed()


def take_job():
    try:
        os.unlink(SOCKET)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(SOCKET)
    srv.listen(1)
    conn, _ = srv.accept()
    srv.close()
    try:
        os.unlink(SOCKET)
    except OSError:
        pass
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return conn, json.loads(buf)


def run(job):
    code = job["code"]
    os.environ.update(job.get("env") or {})
    cwd = job.get("cwd")
    if cwd:
        os.chdir(cwd)
    sys.argv = ["-c"] + list(job.get("args") or [])
    sys.path[0] = ""
    reseed()
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        return e.code
    except BaseException:
        # Print the traceback as `python3 -c` does, without the runner's frame.
        etype, value, tb = sys.exc_info()
        traceback.print_exception(etype, value, tb.tb_next if tb else None)
        return 1
    return 0


def main():
    sys.stdout.reconfigure(line_buffering=True)
    conn, job = take_job()
    sys.modules["thaw_runner_conn"] = conn
    status = run(job)
    hooks = sys.modules.get("thaw_runner_hooks")
    if hooks is not None:
        try:
            hooks.after_job(conn)
        except Exception:  # a hook must not change the job's outcome
            traceback.print_exc()
    try:
        conn.close()
    except OSError:
        pass
    finish(status)


def exit_code(status):
    """The process status `sys.exit(status)` would give."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status & 0xFF
    # A non-integer code is printed to stderr and exits 1, as python does.
    print(status, file=sys.stderr)
    return 1


def finish(status):
    """Ends the process as `python3 -c` would, minus the interpreter's
    teardown of every module, which costs ≈ 18 ms of system calls under
    gVisor: wait for non-daemon threads, run atexit handlers, drop the job's
    globals (so files it left open are flushed and closed), collect
    cycles, flush stdio, then `_exit`."""
    try:
        code = exit_code(status)
        threading = sys.modules.get("threading")
        if threading is not None and hasattr(threading, "_shutdown"):
            threading._shutdown()
        atexit._run_exitfuncs()
        main = sys.modules.get("__main__")
        if main is not None:
            main.__dict__.clear()
        gc.collect()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(status)
    os._exit(code)


if __name__ == "__main__":
    main()
