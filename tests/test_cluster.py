"""The gate on a real local Ray (scanner/runtime/cluster.py), in a network namespace of its own.

Ray binds to the machine's interface address; inside ``unshare -n`` with only the loopback device up, every
Ray socket is on 127.0.0.1. Each case runs the CLI in such a namespace (a fresh local Ray per run, about 10-15 s
to start) and compares with the in-process gate.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import CLEAN, without_timings, zoo_path

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

NAMESPACE = HAVE_RAY and os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
pytestmark = pytest.mark.skipif(not NAMESPACE, reason="needs Ray (pip install -e '.[ray]'), root, unshare and ip "
                                                       "(a network namespace holding only the loopback device)")
FAST = ("--limit", "200", "--queries", "20000", "--budget", "0")


def _in_namespace(args, **kw):
    """Popen of ``python -m scanner ARGS`` in a new network namespace with only loopback up."""
    cmd = " ".join(["ip link set lo up && exec", sys.executable, "-m", "scanner", *[f"'{a}'" for a in map(str, args)]])
    return subprocess.Popen(["unshare", "-n", "sh", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_ray_report_equals_the_sequential_one(run_cli, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"not a model")
    models = [zoo_path("cnn_badnets"), zoo_path("cnn_clean"), bad]
    rc, out, err = run_cli("gate", *models, "--data", CLEAN, *FAST, "--threads", "1", "--format", "json")
    assert rc == 2, err  # one error entry, the worst code
    html = tmp_path / "audit.html"
    p = _in_namespace(["-v", "gate", *models, "--data", CLEAN, *FAST, "--ray", "--ray-cpus", "1", "--format", "json",
                       "--html", html])
    ray_out, ray_err = p.communicate(timeout=600)
    assert p.returncode == 2, ray_err
    page = html.read_text()  # the audit views were drawn on the workers: the synthesized triggers are in it
    assert "data:image/png;base64," in page and page.count(str(zoo_path("cnn_badnets"))) >= 1
    sequential, on_ray = json.loads(out), json.loads(ray_out)
    assert [m["status"] for m in on_ray["models"]] == ["failed", "passed", "error"]
    assert without_timings(on_ray) == without_timings(sequential)
    assert "[3/3]" in ray_err  # progress per model as results come in


def test_a_model_that_kills_its_worker_twice_is_an_error_entry(tmp_path):
    """The test kills every worker that runs cnn_badnets (a segfault, an OOM kill look the same to Ray): it is
    retried once, then recorded as an error; cnn_clean still passes; the exit code is 2, as for any error."""
    out = tmp_path / "gate.json"
    p = _in_namespace(["gate", zoo_path("cnn_badnets"), zoo_path("cnn_clean"), "--data", CLEAN, *FAST, "--ray",
                       "--format", "json", "-o", out])
    kills, stop = [], threading.Event()

    def killer():
        while not stop.is_set():
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            for line in ps.splitlines():
                if "ray::gate:cnn_badnets.onnx" in line:
                    pid = int(line.split()[0])
                    if pid not in kills:
                        kills.append(pid)
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        _, err = p.communicate(timeout=600)
    finally:
        stop.set()
        t.join()
    assert p.returncode == 2, err
    report = json.loads(out.read_text())
    bad, clean = report["models"]
    assert len(kills) == 2  # the first try and its one retry
    assert bad["status"] == "error" and "worker" in bad["error"] and "died" in bad["error"]
    assert clean["status"] == "passed" and clean["verdict"] == "clean"


def _tasks_of(session):
    """PIDs of the Ray model tasks running in ``session`` (the gate's process session)."""
    ps = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
    return [int(f[0]) for f in (ln.split(None, 2) for ln in ps.splitlines()[1:])
            if len(f) == 3 and f[1] == str(session) and f[2].startswith("ray::gate:")]


def test_ctrl_c_cancels_and_writes_nothing(tmp_path):
    out = tmp_path / "gate.json"
    p = _in_namespace(["gate", zoo_path("cnn_badnets"), zoo_path("cnn_clean"), "--data", CLEAN, "--budget", "0",
                       "--ray", "--format", "json", "-o", out], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _tasks_of(p.pid):  # wait until the model tasks run
        time.sleep(0.2)
    assert _tasks_of(p.pid), "the model tasks never started"
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err and not out.exists()
    deadline = time.time() + 30
    while time.time() < deadline and _tasks_of(p.pid):
        time.sleep(0.5)
    assert not _tasks_of(p.pid), "model tasks still running after Ctrl-C"
