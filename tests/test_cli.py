"""The command line: help, version, exit codes, stdout holding only the product."""

import json
import subprocess
import sys

import pytest

from conftest import CLEAN, MODELS, ROOT, zoo_path


def test_help_lists_commands(run_cli):
    code, out, err = run_cli("--help")
    assert code == 0
    for cmd in ("inspect", "scan", "prune", "sanitize", "evaluate", "gate"):
        assert cmd in out
    assert "Exit codes" in out


def test_version_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "scanner", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "scanner, version" in out.stdout


@pytest.mark.parametrize("cmd", ["inspect", "scan", "prune", "sanitize", "evaluate", "gate"])
def test_every_command_has_an_example(run_cli, cmd):
    code, out, _ = run_cli(cmd, "--help")
    assert code == 0 and "Example" in out and "scanner " + cmd in out


def test_missing_onnxruntime_is_one_line(tmp_path):
    (tmp_path / "onnxruntime.py").write_text("raise ImportError('No module named onnxruntime')\n")
    model = zoo_path("cnn_clean")
    proc = subprocess.run(
        [sys.executable, "-m", "scanner", "inspect", str(model)],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "onnxruntime is not installed" in proc.stderr and "pip install" in proc.stderr


def test_wrong_flag_is_exit_2(run_cli):
    code, out, err = run_cli("scan", "--no-such-flag")
    assert code == 2 and "no such option" in err.lower() and out == ""


@pytest.mark.parametrize("cmd", ["scan", "gate"])
def test_cuda_without_a_cuda_runtime_fails_loudly(run_cli, cmd):
    """`--device cuda` on an onnxruntime without the CUDA provider: one line saying so, exit 2, never a silent
    fall back to the CPU (onnxruntime-gpu on a machine without a GPU would fall back: that is refused too)."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    code, out, err = run_cli(cmd, zoo_path("cnn_clean"), "--data", CLEAN, "--device", "cuda", "--format", "json")
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert "--device cuda" in err and "scanner[gpu]" in err


def test_bad_model_is_one_line_exit_2(run_cli, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    code, out, err = run_cli("inspect", bad)
    assert code == 2 and out == ""
    assert err.startswith(f"scanner: error: {bad}:") and err.count("\n") == 1 and "Traceback" not in err


def test_inspect_json(run_cli):
    code, out, _ = run_cli("inspect", zoo_path("cnn_clean"), "--format", "json")
    info = json.loads(out)
    assert code == 0 and info["schema"] == "scanner.inspect/1"
    assert sum(l["is_last_conv"] for l in info["layers"]) == 1
    assert info["preprocess"]["color"] == "gray"


def test_scan_json_is_the_only_stdout(run_cli):
    code, out, err = run_cli(
        "scan", zoo_path("cnn_badnets"), "--data", CLEAN, "--probe", MODELS / "triggers" / "badnets_3x3.json",
        "--format", "json", "--limit", "200", "-v",
    )
    assert code == 0
    report = json.loads(out)  # nothing else on stdout
    assert report["schema"] == "scanner.scan/1" and report["data"]["clean"]["images"] == 200
    assert report["top_channels"] and report["probe"]["effect"]["dominant_class"] == 0


def test_output_file_needs_force(run_cli, tmp_path):
    out_file = tmp_path / "scan.json"
    args = ("scan", zoo_path("cnn_clean"), "--data", CLEAN, "--limit", "50", "--format", "json", "-o", out_file)
    assert run_cli(*args)[0] == 0
    json.loads(out_file.read_text())
    code, _, err = run_cli(*args)
    assert code == 2 and "--force" in err
    assert run_cli(*args, "--force")[0] == 0
