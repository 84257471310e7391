"""Long fuzz run over the model loader (and, for files it accepts, inspect + an onnxruntime session).

Two engines:

    python fuzz/fuzz_loader.py hypothesis --examples 5000      # mutations of real models (tests/fuzzing.py)
    python fuzz/fuzz_loader.py atheris -max_total_time=600     # coverage-guided bytes (pip install atheris)

Property: a file is either accepted (and then inspects and runs) or refused with a ScannerError; any other
exception is a bug and stops the run with the input saved under fuzz/crashes/. Results: fuzz/README.md.
"""

import collections
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import graphs  # noqa: E402
from fuzzing import BYTE_OPS, PROTO_EDITS, check_loader, mutate_bytes, proto_edit  # noqa: E402

CRASHES = ROOT / "fuzz" / "crashes"
TMP = Path(tempfile.mkdtemp(prefix="scanner-fuzz-"))
(TMP / "w.bin").write_bytes(b"\0" * 4096)


def seeds():
    out = [graphs.conv_relu(opset=17, size=8).SerializeToString(), graphs.conv_bn_relu(opset=13).SerializeToString()]
    for name in ("cnn_clean", "cnn_badnets_bnunfused"):
        p = ROOT / "models" / f"{name}.onnx"
        if p.exists():
            out.append(p.read_bytes())
    return out


def one(data, counts):
    path = TMP / "m.onnx"
    path.write_bytes(data)
    try:
        counts[check_loader(path, run=len(data) < 200_000)] += 1
    except Exception:
        CRASHES.mkdir(exist_ok=True)
        crash = CRASHES / f"crash-{hashlib.sha1(data).hexdigest()[:12]}.onnx"
        crash.write_bytes(data)
        print(f"\nCRASH saved to {crash}", file=sys.stderr)
        raise


def run_hypothesis(examples):
    import numpy as np
    import onnx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    corpus = seeds()
    counts = collections.Counter()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        which=st.integers(0, len(corpus) - 1),
        ops=st.lists(st.tuples(st.sampled_from(BYTE_OPS), st.floats(0, 1), st.integers(0, 2**16)), max_size=6),
        edits=st.lists(st.tuples(st.sampled_from(PROTO_EDITS), st.integers(0, 2**20)), max_size=3),
        seed=st.integers(0, 2**32 - 1),
    )
    def fuzz(which, ops, edits, seed):
        model = onnx.ModelProto.FromString(corpus[which])
        rng = np.random.default_rng(seed)
        for edit, value in edits:
            model = proto_edit(model, edit, value, rng)
        try:
            data = model.SerializeToString()
        except Exception:  # noqa: BLE001
            return
        one(mutate_bytes(data, ops), counts)

    start = time.time()
    fuzz()
    print(f"hypothesis: {examples} examples in {time.time() - start:.0f} s: {dict(counts)}")


def run_atheris(argv):
    import atheris

    with atheris.instrument_imports(include=["scanner"]):
        import scanner.commands.inspect  # noqa: F401
        import scanner.graph.model  # noqa: F401
        import scanner.runtime.session  # noqa: F401
    counts = collections.Counter()
    corpus = TMP / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seeds()):
        (corpus / f"seed{i}.onnx").write_bytes(data)

    def test_one(data):
        one(bytes(data), counts)

    CRASHES.mkdir(exist_ok=True)
    atheris.Setup([argv[0], f"-artifact_prefix={CRASHES}/", *argv[1:], str(corpus)], test_one)
    try:
        atheris.Fuzz()
    finally:
        print(f"atheris: {dict(counts)}")


if __name__ == "__main__":
    engine = sys.argv[1] if len(sys.argv) > 1 else "hypothesis"
    if engine == "atheris":
        run_atheris([sys.argv[0]] + sys.argv[2:])
    else:
        n = int(sys.argv[sys.argv.index("--examples") + 1]) if "--examples" in sys.argv else 2000
        run_hypothesis(n)
