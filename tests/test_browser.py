"""TensorBoard and report.html in a real browser, offline.

A module fixture builds a real log directory: a tiny torch.profiler CPU trace per measured
variant of the sample report (written by torch.profiler.tensorboard_trace_handler, gzip, as
autoopt's profiler writes them) plus autoopt's summaries. TensorBoard runs on it through
autoopt.output.view, on 127.0.0.1. The tests read TensorBoard's HTTP API and drive headless
Chromium through chromedriver's W3C WebDriver HTTP API (stdlib only), with the network cut
off (a dead proxy and a resolver that finds no host but 127.0.0.1). Screenshots go to
test-artifacts/ in the project root.

Chromium comes from `apt-get install -y chromium chromium-driver` (.ci/run does it).
"""
from __future__ import annotations

import base64
import copy
import gzip
import io
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from autoopt.output import report as R
from autoopt.output import tensorboard as tbsummary
from autoopt.output import view

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parent / "data" / "report_sample.json"
ARTIFACTS = ROOT / "test-artifacts"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
NEEDS_BROWSER = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="Chromium not installed: apt-get install -y chromium chromium-driver",
)

# every element's visible text, through shadow roots (TensorBoard's Polymer dashboards)
VISIBLE_TEXT_JS = """
const out = [];
const walk = (n) => {
  if (!n) return;
  if (n.nodeType === 3) {
    const p = n.parentElement;
    if (p && p.checkVisibility({checkOpacity: true, checkVisibilityCSS: true})) out.push(n.nodeValue);
    return;
  }
  if (n.nodeType === 1) {
    if (['SCRIPT', 'STYLE', 'TEMPLATE', 'NOSCRIPT'].includes(n.tagName)) return;
    if (n.shadowRoot) walk(n.shadowRoot);
  }
  for (const c of n.childNodes) walk(c);
};
walk(document.body);
return out.join(' ').replace(/\\s+/g, ' ');
"""

# loaded <img> elements, through shadow roots: [src, naturalWidth, naturalHeight]
IMAGES_JS = """
const out = [];
const walk = (n) => {
  if (!n || n.nodeType !== 1 && n.nodeType !== 11) return;
  if (n.tagName === 'IMG' && n.complete) out.push([n.getAttribute('src') || '', n.naturalWidth, n.naturalHeight]);
  if (n.shadowRoot) walk(n.shadowRoot);
  for (const c of n.children || []) walk(c);
};
walk(document.body);
return out;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_json(url: str, body=None, timeout: float = 30.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        raw = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        return json.loads(raw)


def _wait(pred, timeout_s: float, what: str, interval: float = 0.5):
    """Poll pred() until it returns a truthy value; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {str(last)[:500]}")


class Browser:
    """Headless Chromium through chromedriver's W3C WebDriver HTTP API."""

    def __init__(self, width: int = 1400, height: int = 1000):
        self.port = _free_port()
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.sid = None
        try:
            _wait(lambda: self._call("GET", "/status", timeout=2)["ready"], 30, "chromedriver", 0.1)
            args = [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-extensions", "--disable-sync",
                f"--window-size={width},{height}", "--hide-scrollbars",
                # network off: every request not to 127.0.0.1 goes to a dead proxy, and no
                # host name but 127.0.0.1 resolves
                "--proxy-server=http://127.0.0.1:9",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            ]
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                "timeouts": {"pageLoad": 60000, "script": 30000},
            }}}
            self.sid = self._call("POST", "/session", caps, timeout=90)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body=None, timeout: float = 60.0):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.code} {e.read()[:1000]!r}") from None

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.sid}/url", {"url": "about:blank"})
        self._call("POST", f"/session/{self.sid}/url", {"url": url})

    def js(self, script: str, *args):
        return self._call("POST", f"/session/{self.sid}/execute/sync", {"script": script, "args": list(args)})

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(self._call("GET", f"/session/{self.sid}/screenshot"))
        path = ARTIFACTS / name
        path.write_bytes(png)
        return path

    def element_png(self, css: str) -> bytes:
        el = self._call("POST", f"/session/{self.sid}/element", {"using": "css selector", "value": css})
        eid = next(iter(el.values()))
        return base64.b64decode(self._call("GET", f"/session/{self.sid}/element/{eid}/screenshot"))

    def visible_text(self) -> str:
        return self.js(VISIBLE_TEXT_JS)

    def wait_text(self, needles: list[str], timeout_s: float, what: str) -> str:
        def ok():
            t = self.visible_text()
            return t if all(n in t for n in needles) else None
        return _wait(ok, timeout_s, f"{what} to show {needles}")

    def close(self) -> None:
        if self.sid:
            try:
                self._call("DELETE", f"/session/{self.sid}", timeout=30)
            except (urllib.error.URLError, OSError):
                pass
            self.sid = None
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(timeout=15)


def _sample() -> dict:
    return json.loads(SAMPLE.read_text())


def _profile_into(run_dir: Path) -> None:
    """A tiny real torch.profiler CPU trace in RUN_DIR, written the way autoopt writes them."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(8, 16)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        schedule=torch.profiler.schedule(wait=0, warmup=1, active=2, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(run_dir), worker_name="host", use_gzip=True),
    ) as prof:
        for _ in range(3):
            model(x).sum().backward()
            prof.step()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """(tb dir, report): a report directory's tb/ with a real trace per measured variant
    and autoopt's summaries."""
    rep = _sample()
    tb = tmp_path_factory.mktemp("report") / "tb"
    for v in rep["variants"]:
        v["logdir"] = str(tb / tbsummary.run_name(v["name"]))
        if v["step_time_ms"] is not None or v["status"] == "failed":
            _profile_into(Path(v["logdir"]))
    tbsummary.write_summaries(rep, tb)
    return tb, rep


@pytest.fixture(scope="module")
def tensorboard(logdir):
    tb, _ = logdir
    proc, url = view.start_tensorboard(tb.parent)  # a report dir: view finds its tb/
    try:
        try:  # let the profiler plugin start loading its runs while the other tests run
            _http_json(url + "data/plugin/pytorch_profiler/runs", timeout=10)
        except (urllib.error.URLError, OSError):
            pass
        yield url
    finally:
        view.stop(proc)
        assert proc.poll() is not None


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium not installed: apt-get install -y chromium chromium-driver")
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def _traced_variants(rep: dict) -> list[str]:
    return [v["name"] for v in rep["variants"] if v["step_time_ms"] is not None or v["status"] == "failed"]


# --------------------------------------------------------------------------------------
# TensorBoard's HTTP API


def test_tensorboard_serves_scalars_of_every_measured_variant(tensorboard, logdir):
    _, rep = logdir
    measured = [v for v in rep["variants"] if v["step_time_ms"] is not None]
    tags = _wait(lambda: (t := _http_json(tensorboard + "data/plugin/scalars/tags"))
                 and all(v["name"] in t for v in measured) and t, 60, "scalar tags of every variant")
    for v in measured:
        assert {"autoopt/step_time_ms", "autoopt/throughput_per_s", "autoopt/speedup",
                "autoopt/peak_memory_mb"} <= set(tags[v["name"]])
        q = urllib.parse.urlencode({"run": v["name"], "tag": "autoopt/step_time_ms"})
        series = _http_json(tensorboard + "data/plugin/scalars/scalars?" + q)
        assert len(series) == 1
        assert series[0][2] == pytest.approx(v["step_time_ms"]["median"], rel=1e-6)
    q = urllib.parse.urlencode({"run": "baseline", "tag": "autoopt/batch_search/throughput_per_s"})
    curve = _http_json(tensorboard + "data/plugin/scalars/scalars?" + q)
    ok = [b for b in rep["batch_search"] if b["throughput_per_s"] is not None]
    assert [p[1] for p in curve] == [b["batch_size"] for b in ok]


def test_tensorboard_serves_findings_and_report_text(tensorboard, logdir):
    _, rep = logdir
    tags = _wait(lambda: _http_json(tensorboard + "data/plugin/text/tags").get("baseline"), 60, "text tags")
    assert {"autoopt/findings", "autoopt/report", "autoopt/summary", "autoopt/variant"} <= set(tags)
    q = urllib.parse.urlencode({"run": "baseline", "tag": "autoopt/findings"})
    findings_html = _http_json(tensorboard + "data/plugin/text/text?" + q)[0]["text"]
    for f in rep["findings"]:
        assert f["code"] in findings_html and f["title"] in findings_html
    q = urllib.parse.urlencode({"run": "baseline", "tag": "autoopt/report"})
    table_html = _http_json(tensorboard + "data/plugin/text/text?" + q)[0]["text"]
    assert "<table>" in table_html
    for v in rep["variants"]:
        assert f"<td>{v['name']}</td>" in table_html


def test_tensorboard_hparams_has_one_session_per_variant(tensorboard, logdir):
    _, rep = logdir
    exp = _wait(lambda: _http_json(tensorboard + "data/plugin/hparams/experiment", {"experimentName": ""})
                .get("hparamInfos"), 60, "the hparams experiment")
    names = {h["name"] for h in exp}
    assert {"variant", "status", "transform.amp", "transform.channels_last", "batch_size"} <= names
    body = {"experimentName": "", "startIndex": 0, "sliceSize": 100, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}
    groups = _http_json(tensorboard + "data/plugin/hparams/session_groups", body)["sessionGroups"]
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {v["name"] for v in rep["variants"]}
    for v in rep["variants"]:
        g = by_name[v["name"]]
        assert g["hparams"]["status"] == v["status"]
        metrics = {m["name"]["tag"]: m["value"] for m in g.get("metricValues", [])}
        if v["speedup"] is not None:
            assert metrics["autoopt/speedup"] == pytest.approx(v["speedup"], rel=1e-6)
        else:
            assert "autoopt/speedup" not in metrics
    assert by_name["AO101"]["hparams"]["transform.amp"] == "dtype=bfloat16"
    assert by_name["AO201"]["hparams"]["transform.amp"] == "off"


def test_profiler_plugin_lists_every_variant_and_diffs_baseline_with_final(tensorboard, logdir):
    _, rep = logdir
    traced = _traced_variants(rep)

    def loaded():
        r = _http_json(tensorboard + "data/plugin/pytorch_profiler/runs")
        return r if not r.get("loading") and set(traced) <= set(r.get("runs", [])) else None

    runs = _wait(loaded, 240, "torch-tb-profiler to load every run", 1.0)
    assert set(runs["runs"]) == set(traced)

    def first(run):
        q = urllib.parse.urlencode({"run": run, "view": "Overview"})
        worker = _http_json(tensorboard + "data/plugin/pytorch_profiler/workers?" + q)[0]
        q = urllib.parse.urlencode({"run": run, "worker": worker})
        spans = _http_json(tensorboard + "data/plugin/pytorch_profiler/spans?" + q)
        return worker, (spans[0] if spans else "")

    for run in traced:
        views = _http_json(tensorboard + "data/plugin/pytorch_profiler/views?run=" + urllib.parse.quote(run))
        assert "Overview" in views and "Operator" in views and "Trace" in views
    (bw, bs), (fw, fs) = first("baseline"), first("final")
    q = urllib.parse.urlencode({"run": "baseline", "worker": bw, "span": bs,
                                "exp_run": "final", "exp_worker": fw, "exp_span": fs})
    diff = _http_json(tensorboard + "data/plugin/pytorch_profiler/diffnode?" + q, timeout=60)
    # the Diff view's root node: baseline on the left, final on the right, both with time
    assert diff["left"]["total_duration"] > 0 and diff["right"]["total_duration"] > 0


# --------------------------------------------------------------------------------------
# TensorBoard in headless Chromium


@NEEDS_BROWSER
def test_scalars_dashboard_shows_autoopt_scalars(browser, tensorboard, logdir):
    _, rep = logdir
    browser.get(tensorboard + "#scalars")
    text = browser.wait_text(["autoopt/step_time_ms", "autoopt/speedup", "baseline", "final"], 90,
                             "the scalars dashboard")
    assert "autoopt/throughput_per_s" in text
    browser.screenshot("tensorboard-scalars.png")


@NEEDS_BROWSER
def test_text_dashboard_shows_findings_and_table(browser, tensorboard, logdir):
    _, rep = logdir
    browser.get(tensorboard + "#text")
    f = rep["findings"][0]
    text = browser.wait_text(["autoopt/findings", f"{f['code']} {f['name']}", f["title"]], 90,
                             "the text dashboard")
    assert "autoopt/report" in text
    browser.screenshot("tensorboard-text.png")


@NEEDS_BROWSER
def test_hparams_dashboard_compares_every_variant(browser, tensorboard, logdir):
    _, rep = logdir
    browser.get(tensorboard + "#hparams")
    names = [v["name"] for v in rep["variants"]]
    text = browser.wait_text(["transform.amp", "dtype=bfloat16", "rejected", *names], 90, "the hparams dashboard")
    assert "autoopt/speedup" in text
    browser.screenshot("tensorboard-hparams.png")


@NEEDS_BROWSER
def test_images_dashboard_shows_step_time_breakdown(browser, tensorboard):
    browser.get(tensorboard + "#images")
    browser.wait_text(["autoopt/step_time_breakdown"], 90, "the images dashboard")
    imgs = _wait(lambda: [i for i in browser.js(IMAGES_JS) if "individualImage" in i[0] and i[1] > 100],
                 60, "the breakdown image to load")
    assert imgs[0][2] > 50
    browser.screenshot("tensorboard-images.png")


# --------------------------------------------------------------------------------------
# report.html from file:// with the network off


@NEEDS_BROWSER
def test_the_browser_has_no_network(browser):
    """The harness itself: a page on the internet does not load (so 'renders offline' below
    means what it says)."""
    try:
        browser.get("http://example.com/")
    except AssertionError as e:  # WebDriver reports the failed navigation
        assert "ERR_" in str(e)
    else:
        assert "Example Domain" not in browser.visible_text()
        assert browser.js("return location.href").startswith("chrome-error://")



def _color_pixels(png: bytes, rgb: tuple[int, int, int], tol: int = 12) -> int:
    import matplotlib.image
    import numpy as np

    img = (matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(int)
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum())


def _hex(c: str) -> tuple[int, int, int]:
    return tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))


@NEEDS_BROWSER
def test_report_html_renders_tables_and_plots_offline(browser, tmp_path):
    rep = _sample()
    page = R.write_html(rep, tmp_path / "report.html")
    browser.get(page.resolve().as_uri())
    info = browser.js("""
        const rows = [...document.querySelectorAll('table.variants tbody tr')]
            .map(r => [...r.cells].map(c => c.innerText.trim()));
        const plots = {};
        for (const s of document.querySelectorAll('svg.plot')) {
            const b = s.getBoundingClientRect();
            plots[s.dataset.plot] = {w: b.width, h: b.height,
                bars: [...s.querySelectorAll('g.bar')].filter(r => r.getBoundingClientRect().width > 0).length,
                points: s.querySelectorAll('g.pt').length, misses: s.querySelectorAll('g.miss').length,
                errbars: s.querySelectorAll('g.errbar').length};
        }
        return {rows, plots, title: document.title,
                resources: performance.getEntriesByType('resource').map(e => e.name),
                speedup: document.querySelector('.card.big .v').innerText,
                diff_adds: document.querySelectorAll('pre.diff span.add').length,
                diff_dels: document.querySelectorAll('pre.diff span.del').length,
                add_color: getComputedStyle(document.querySelector('pre.diff span.add')).backgroundColor,
                docs: document.querySelectorAll('.finding .doc h4').length,
                findings: document.querySelectorAll('.finding').length};
    """)
    browser.screenshot("report-html.png")
    assert info["resources"] == []  # nothing was fetched: no network needed
    assert info["title"] == f"autoopt report: {rep['model']}"
    assert [r[0] for r in info["rows"]] == [v["name"] for v in rep["variants"]]
    assert [r[2] for r in info["rows"]] == [v["status"] for v in rep["variants"]]
    assert info["speedup"] == R.fmt_x(rep["final"]["speedup"])
    plots = info["plots"]
    assert set(plots) == {"breakdown", "speedup", "batch_search", "top_baseline", "top_final"}
    for p in plots.values():
        assert p["w"] > 300 and p["h"] > 100
    with_speedup = [v for v in rep["variants"] if v["speedup"] is not None]
    assert plots["speedup"]["bars"] == len(with_speedup)
    # every speedup with its interval but the baseline's (the reference itself)
    assert plots["speedup"]["errbars"] == len([v for v in with_speedup if v["name"] != "baseline"])
    nonzero = sum(1 for a in rep["analysis"].values() for k, ms in a["breakdown_ms"].items() if ms > 0)
    assert plots["breakdown"]["bars"] == nonzero
    ok = [b for b in rep["batch_search"] if b["throughput_per_s"] is not None]
    assert plots["batch_search"]["points"] == len(ok)
    assert plots["batch_search"]["misses"] == len(rep["batch_search"]) - len(ok)
    assert plots["top_baseline"]["bars"] == len(rep["analysis"]["baseline"]["top_operators"])
    adds = [ln for ln in rep["patch"].splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    dels = [ln for ln in rep["patch"].splitlines() if ln.startswith("-") and not ln.startswith("---")]
    assert (info["diff_adds"], info["diff_dels"]) == (len(adds), len(dels))
    assert info["add_color"] == "rgb(230, 255, 236)"
    assert info["findings"] == len(rep["findings"])
    assert info["docs"] >= len(rep["findings"])  # each rule's "## What it does" rendered as a heading
    # the plots are painted, not just in the DOM: the speedup chart shows kept (green)
    # and rejected (red) bars, the breakdown its CPU-execution colour
    speed_png = browser.element_png('svg[data-plot="speedup"]')
    (ARTIFACTS / "report-html-speedup.png").write_bytes(speed_png)
    assert _color_pixels(speed_png, _hex(R.STATUS_COLORS["kept"])) > 500
    assert _color_pixels(speed_png, _hex(R.STATUS_COLORS["rejected"])) > 100
    assert _color_pixels(browser.element_png('svg[data-plot="breakdown"]'),
                         _hex(R.BREAKDOWN_COLORS["cpu_exec"])) > 500


@NEEDS_BROWSER
def test_report_html_shows_hostile_names_as_text(browser, tmp_path):
    rep = _sample()
    evil = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
    rep["model"] = "net" + evil
    rep["variants"][1]["reason"] = "bad " + evil
    rep["analysis"]["baseline"]["top_operators"][0]["name"] = "aten::op" + evil
    rep["findings"][0]["doc"] = "## What it does\n" + evil + "\n[x](javascript:alert(1))"
    rep["patch"] += "+" + evil + "\n"
    page = R.write_html(rep, tmp_path / "report.html")
    browser.get(page.resolve().as_uri())
    info = browser.js("""return {title: document.title, imgs: document.querySelectorAll('img').length,
        scripts: document.querySelectorAll('script').length,
        jslinks: [...document.querySelectorAll('a')].filter(a => a.href.startsWith('javascript')).length,
        model: document.getElementById('model-name').textContent};""")
    assert info == {"title": "autoopt report: net" + evil, "imgs": 0, "scripts": 0, "jslinks": 0,
                    "model": "net" + evil}


@NEEDS_BROWSER
def test_report_html_of_a_failed_gpu_run_renders(browser, tmp_path):
    rep = _sample()
    rep["device"] = {"type": "cuda", "name": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0",
                     "total_memory_mb": 40960.0}
    rep["analysis"] = {"baseline": copy.deepcopy(rep["analysis"]["baseline"]), "final": None}
    rep["analysis"]["baseline"]["top_kernels"] = [
        {"name": "void cutlass::Kernel<cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4>(Params)",
         "calls": 12, "total_ms": 9.5},
        {"name": "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                 "at::detail::Array<char*, 1> >(int, at::native::FillFunctor<float>, at::detail::Array<char*, 1>)",
         "calls": 40, "total_ms": 1.25},
    ]
    rep["final"] = None
    rep["variants"] = rep["variants"][:2] + [rep["variants"][4]]
    rep["batch_search"] = None
    rep["patch"] = None
    page = R.write_html(rep, tmp_path / "report.html")
    browser.get(page.resolve().as_uri())
    text = browser.visible_text()
    browser.screenshot("report-html-failed-gpu.png")
    assert "NVIDIA A100-SXM4-40GB" in text and "not measured" in text
    assert "Top kernels, baseline" in text and "cutlass::Kernel<cutlass_80" in text
    assert "No patch" in text
    assert browser.js("return performance.getEntriesByType('resource').length") == 0
