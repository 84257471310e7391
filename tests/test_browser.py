"""The HTML audit in a real browser: headless Chromium loads it offline, nothing is missing, every image draws.

Needs the Debian packages chromium and chromium-driver (`.ci/run` installs them); skipped without them.
A copy of the page gets a probe script that writes what the browser saw into the DOM, read back with
`--dump-dom`; the page itself carries no script. A screenshot is kept for people (`tmp_path`).
"""

import html
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import CLEAN, MODELS
from gatecache import _cache_analyses  # noqa: F401  (autouse fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium chromium-driver)")

PROBE = """<script>
window.__missing = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  if (t && t !== window) window.__missing.push((t.tagName || '?') + ' ' + (t.src || t.href || ''));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var refs = Array.prototype.slice.call(document.querySelectorAll('[src],[href]')).map(function (e) {
    return e.getAttribute('src') || e.getAttribute('href'); });
  var out = document.createElement('pre');
  out.id = '__probe';
  out.textContent = JSON.stringify({
    title: document.title,
    images: imgs.length,
    undrawn: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0); })
                 .map(function (i) { return i.alt; }),
    missing: window.__missing,
    fetched: performance.getEntriesByType('resource').map(function (r) { return r.name; }),
    external: refs.filter(function (u) { return !/^(data:|#)/.test(u); }),
    width: document.documentElement.scrollWidth
  });
  document.body.appendChild(out);
});
</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars"]


def chromium(tmp_path, *args):
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *map(str, args)]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def browse(page, tmp_path, width=1280):
    """What Chromium saw loading ``page`` (a file), and a screenshot of it."""
    text = page.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    proc = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probed.resolve().as_uri())
    found = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    shot = tmp_path / f"{page.stem}.png"
    chromium(tmp_path, f"--window-size={width},2400", f"--screenshot={shot}", page.resolve().as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    return seen


def check(seen, min_images):
    assert seen["missing"] == [] and seen["fetched"] == [] and seen["external"] == []
    assert seen["images"] >= min_images and seen["undrawn"] == []
    assert seen["width"] <= 1300  # no horizontal scrolling at 1280 px


def test_gate_audit_in_chromium(run_cli, tmp_path):
    page = tmp_path / "gate.html"
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    code, out, err = run_cli("gate", MODELS / "cnn_badnets.onnx", MODELS / "cnn_clean.onnx", bad, "--data", CLEAN,
                             "--budget", "0", "--threads", "2", "--html", page)
    assert code == 2, err
    assert "not a valid ONNX model" in page.read_text()
    seen = browse(page, tmp_path)
    assert seen["title"] == "scanner audit: deployment gate"
    # per model: sizes chart, 2 channel figures, trigger strips (preview + 4 + 4) and a saliency map
    check(seen, 2 * (1 + 2 + 10))


def test_scan_audit_in_chromium(run_cli, tmp_path):
    page = tmp_path / "scan.html"
    code, _, err = run_cli("scan", MODELS / "cnn_badnets.onnx", "--data", CLEAN, "--probe", MODELS / "triggers" / "badnets_3x3.json",
                           "--limit", "128", "--html", page)
    assert code == 0, err
    seen = browse(page, tmp_path)
    check(seen, 2 + 10)
