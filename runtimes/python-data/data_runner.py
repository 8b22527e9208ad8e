"""thaw's warm runner for data work: python with numpy, pandas and
matplotlib (Agg) imported before the snapshot, so a job pays for none of it.

Figures come back as PNG outputs (docs/runner-protocol.md): every figure a
job saves (``savefig``) or shows (``plt.show()``) is sent when that happens,
and every figure still open when the job ends is sent then. Each restore
re-seeds ``numpy.random`` as well as ``random``.
"""

import base64
import io
import json
import os
import sys
import types

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402
import pandas  # noqa: E402,F401

# Tests set this to play a snapshot: generator state fixed at import, as in
# every restore of one snapshot (runner.py does the same for `random`).
if os.environ.get("THAW_RUNNER_SEED_AT_IMPORT") is not None:
    numpy.random.seed(int(os.environ["THAW_RUNNER_SEED_AT_IMPORT"]))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

_sent = set()


def _send(fig):
    conn = sys.modules.get("thaw_runner_conn")
    if conn is None:
        return
    buf = io.BytesIO()
    _savefig(fig, buf, format="png")
    line = json.dumps({"type": "output", "mime_type": "image/png",
                       "data": base64.b64encode(buf.getvalue()).decode()})
    conn.sendall((line + "\n").encode())
    _sent.add(id(fig))


_savefig = matplotlib.figure.Figure.savefig


def _savefig_and_send(self, *args, **kwargs):
    result = _savefig(self, *args, **kwargs)
    if id(self) not in _sent:
        _send(self)
    return result


def _show(*args, **kwargs):
    for num in plt.get_fignums():
        fig = plt.figure(num)
        if id(fig) not in _sent:
            _send(fig)


matplotlib.figure.Figure.savefig = _savefig_and_send
plt.show = _show


def reseed():
    numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def after_job(conn):
    for num in plt.get_fignums():
        fig = plt.figure(num)
        if id(fig) not in _sent:
            _send(fig)
    plt.close("all")


sys.modules["thaw_runner_reseed"] = types.SimpleNamespace(reseed=reseed)
sys.modules["thaw_runner_hooks"] = types.SimpleNamespace(after_job=after_job)

if __name__ == "__main__":
    runner.main()
