"""The HTML report: the numbers it shows are the solver's, it is deterministic, offline, escaped; and it renders in a
real browser (headless Chromium, networking off, no JavaScript errors, a screenshot that is not blank)."""

from __future__ import annotations

import html
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from optimizer.errors import TrainfitError
from optimizer.report_html import PLOTLY_MISSING, ReportDependencyError, batch_report, estimate_report, solve_report
from optimizer.units import GIB

ROOT = Path(__file__).resolve().parents[1]
PROBLEM = ROOT / "problems" / "qwen2.5-3b-rtx5060ti-16gb.yaml"
CHROMIUM = "/usr/bin/chromium"

try:
    import plotly  # noqa: F401

    HAVE_PLOTLY = True
except ImportError:
    HAVE_PLOTLY = False
needs_plotly = pytest.mark.skipif(not HAVE_PLOTLY, reason='plotly is not installed (pip install -e ".[report]")')


@pytest.fixture(scope="module")
def solved() -> dict:
    """The renderer's inputs, built from the real solver on the reference problem. The only function here that
    names the library's internal modules: when they move, this is the one place to fix."""
    from optimizer.llamafactory.configs import config_files
    from optimizer.memory import estimate, eval_estimate
    from optimizer.models.catalog import resolve_arch
    from optimizer.search.problem import load_problem
    from optimizer.search.solve import solve_problem

    problem, base = load_problem(PROBLEM)
    result = solve_problem(problem, base)
    arch = resolve_arch(result.model)
    estimates = [estimate(arch, s.plan) for s in result.front]
    files = config_files(result, problem, str(PROBLEM), "configs/x", "all", str(base / problem.dataset.file))
    configs = {str(int(name[1:3]) - 1): text for name, text in files.items() if name.startswith("p")}
    rec = result.front[result.recommended]
    rows = [{"model": result.model, "gpu": result.gpu, "result": result.model_dump(mode="json"), "error": None}]
    for update in ({"gpu": "rtx-4090"}, {"gpu": "rtx-3080-10gb", "margin": 0.95}):
        p = problem.model_copy(update=update)
        try:
            r, err = solve_problem(p, base).model_dump(mode="json"), None
        except Exception as exc:  # InfeasibleError: the message the matrix shows
            r, err = None, str(exc)
        rows.append({"model": result.model, "gpu": update["gpu"], "result": r, "error": err})
    return {
        "result": result.model_dump(mode="json"),
        "estimates": [e.model_dump(mode="json") for e in estimates],
        "configs": configs,
        "lengths": result.data_lengths,
        "coverage": result.cutoff_coverage,
        "plan": rec.plan.model_dump(mode="json"),
        "gpu": {"name": "GeForce RTX 5060 Ti 16GB", "memory_mib": result.gpu_total_bytes // 2**20},
        "eval": eval_estimate(arch, rec.plan, eval_batch=8).model_dump(mode="json"),
        "rows": rows,
    }


def _solve_html(d: dict) -> str:
    return solve_report(d["result"], d["estimates"], d["configs"], d["lengths"], d["coverage"])


def _estimate_html(d: dict) -> str:
    r = d["result"]["recommended"]
    return estimate_report(d["estimates"][r], d["plan"], d["gpu"], 0.10, d["eval"])


def _charts(page: str) -> dict[str, dict]:
    """div id -> the figure (data, layout) the page hands to Plotly."""
    out = {}
    for m in re.finditer(r'<script>trainfitPlot\("([^"]+)", (.*?)\);</script>', page):
        out[m.group(1)] = json.loads(m.group(2))
    return out


def _front_rows(page: str) -> list[list[str]]:
    table = re.search(r'<table class="front">.*?</table>', page, re.S).group(0)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    return [[html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", r, re.S)] for r in rows]


def test_plotly_missing_says_how_to_install(monkeypatch):
    for name in ("plotly", "plotly.graph_objects", "plotly.offline"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ReportDependencyError) as exc:
        batch_report([])
    assert str(exc.value) == 'the HTML report needs plotly. Install it: pip install -e ".[report]"' == PLOTLY_MISSING
    assert isinstance(exc.value, TrainfitError)  # the CLI prints it as one `Error:` line


@needs_plotly
def test_front_table_and_chart_show_the_result_numbers(solved):
    page = _solve_html(solved)
    front = solved["result"]["front"]
    rows = _front_rows(page)
    assert len(rows) == len(front)
    for i, (s, row) in enumerate(zip(front, rows)):
        assert row[0] == str(i + 1)
        assert row[1] == ", ".join(s["labels"])
        assert row[3] == str(s["cutoff_len"])
        assert row[-4] == f"{s['device_peak_bytes'] / GIB:.2f}"
        assert row[-3] == f"{s['headroom_bytes'] / GIB:.2f}"
        assert row[-2].startswith(f"{s['time_s']:,.0f} s")
        assert row[-1] == f"{s['quality']:.4f}"
    rec = solved["result"]["recommended"]
    assert f'<tr class="rec"><td>{rec + 1}</td>' in page
    fig = _charts(page)["front"]
    shown = {}
    for tr in fig["data"]:
        if tr.get("mode") == "markers+text":
            for label, x, y, c in zip(tr["text"], tr["x"], tr["y"], tr["marker"]["color"]):
                shown[int(label[1:]) - 1] = (x, y, c, tr["marker"]["symbol"])
    assert sorted(shown) == list(range(len(front)))
    symbols = {"lora": "circle", "qlora4": "diamond", "qlora8": "square", "full": "triangle-up"}
    for i, s in enumerate(front):
        assert shown[i] == (s["time_s"] / 60, s["quality"], s["headroom_bytes"] / GIB, symbols[s["finetuning_type"]])
    star = [tr for tr in fig["data"] if tr["name"].startswith("recommended")]
    assert star[0]["x"] == [front[rec]["time_s"] / 60] and star[0]["y"] == [front[rec]["quality"]]


@needs_plotly
def test_memory_stacks_add_up_to_the_estimates(solved):
    charts = _charts(_solve_html(solved))
    bars = charts["memory-bars"]["data"]
    for j, est in enumerate(solved["estimates"]):
        peak = next(p for p in est["phases"] if p["phase"] == est["peak_phase"])
        terms = sum(tr["y"][j] for tr in bars if not tr["name"].startswith(("allocator cache", "CUDA context")))
        assert abs(terms * GIB - sum(t["bytes"] for t in peak["terms"])) < 1
        assert abs(terms * GIB - est["peak_allocated_bytes"]) < 1
        assert abs(sum(tr["y"][j] for tr in bars) * GIB - est["device_peak_bytes"]) < 1
        # and each bar is the device peak the solver reported for that front point (not only the chart's own input)
        front_peak = solved["result"]["front"][j]["device_peak_bytes"]
        assert abs(sum(tr["y"][j] for tr in bars) * GIB - front_peak) < 1
    lines = {round(sh["y0"] * GIB) for sh in charts["memory-bars"]["layout"]["shapes"]}
    assert lines == {solved["result"]["gpu_total_bytes"], solved["result"]["budget_bytes"]}
    est = solved["estimates"][solved["result"]["recommended"]]
    step = charts["step"]["data"]
    for j, phase in enumerate(est["phases"]):
        assert step[0]["x"][j] == phase["phase"]
        assert abs(sum(tr["y"][j] for tr in step) * GIB - sum(t["bytes"] for t in phase["terms"])) < 1
    peak = next(p for p in est["phases"] if p["phase"] == est["peak_phase"])
    assert any(a["text"] == f"<b>peak</b>: {html.escape(peak['moment'])}" and a["x"] == peak["phase"]
               for a in charts["step"]["layout"]["annotations"])


@needs_plotly
def test_lengths_histogram_and_coverage(solved):
    fig = _charts(_solve_html(solved))["lengths"]
    assert sum(fig["data"][0]["y"]) == len(solved["lengths"]) == solved["result"]["num_samples"]
    texts = {a["text"] for a in fig["layout"]["annotations"]}
    assert texts == {f"{c}: {100 * v:.1f}%" for c, v in solved["coverage"].items()}
    assert sorted(sh["x0"] for sh in fig["layout"]["shapes"]) == sorted(solved["coverage"])
    # without measured lengths: coverage bars from the summary
    d = solved["result"]
    page = solve_report(d, solved["estimates"], solved["configs"], None,
                        {str(k): v for k, v in solved["coverage"].items()})
    bars = _charts(page)["lengths"]["data"][0]
    assert bars["y"] == [100 * solved["coverage"][c] for c in sorted(solved["coverage"])]


@needs_plotly
def test_configs_notes_and_front_values(solved):
    page = _solve_html(solved)
    for i, text in solved["configs"].items():
        pre = re.search(rf'<pre id="yaml-{int(i) + 1}">(.*?)</pre>', page, re.S).group(1)
        assert html.unescape(pre) == text
        assert f"trainfitCopy('yaml-{int(i) + 1}', this)" in page
    for note in solved["result"]["notes"]:
        assert f"<li>{html.escape(note)}</li>" in page
    ranks = ", ".join(str(r) for r in dict.fromkeys(s["lora_rank"] for s in solved["result"]["front"]))
    assert f"<td>lora_rank</td><td>{ranks}</td>" in page


@needs_plotly
def test_deterministic_and_offline(solved):
    from plotly.offline import get_plotlyjs

    page = _solve_html(solved)
    assert page == _solve_html(solved)
    assert _estimate_html(solved) == _estimate_html(solved)
    assert batch_report(solved["rows"]) == batch_report(solved["rows"])
    for p in (page, _estimate_html(solved), batch_report(solved["rows"])):
        assert p.count(get_plotlyjs()) == 1  # inlined once
        ours = p.replace(get_plotlyjs(), "")
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", ours)  # no uuid div ids
        refs = _Refs()
        refs.feed(p)
        assert refs.tags.get("script", 0) >= 2 and refs.external == [], refs.external


class _Refs(HTMLParser):
    """Tags with a src/href attribute (script contents are not parsed as tags)."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for k, v in attrs:
            if k in ("src", "href") or tag == "link":
                self.external.append(f"<{tag} {k}={v!r}>")


@needs_plotly
def test_everything_user_given_is_escaped(solved):
    evil = "<script>alert(1)</script>&"
    r = dict(solved["result"], problem=evil, model=evil, notes=[evil], why=evil)
    page = solve_report(r, solved["estimates"], {"0": evil}, solved["lengths"], solved["coverage"])
    ours = page.replace(__import__("plotly.offline", fromlist=["x"]).get_plotlyjs(), "")
    assert "<script>alert" not in ours
    assert html.escape(evil) in ours
    rows = [{"model": evil, "gpu": "g", "result": None, "error": evil}]
    assert "<script>alert" not in batch_report(rows).replace(
        __import__("plotly.offline", fromlist=["x"]).get_plotlyjs(), "")


@needs_plotly
def test_estimate_report(solved):
    page = _estimate_html(solved)
    est = solved["estimates"][solved["result"]["recommended"]]
    step = _charts(page)["step"]["data"]
    assert step[0]["x"] == [p["phase"] for p in est["phases"]] + ["eval"]
    ev = sum(t["bytes"] for t in solved["eval"]["terms"])
    assert abs(sum(tr["y"][-1] for tr in step) * GIB - ev) < 1
    assert f"device peak {est['device_peak_bytes'] / GIB:.2f} GiB" in page
    head = solved["result"]["gpu_total_bytes"] - est["device_peak_bytes"]
    assert f"Verdict on GeForce RTX 5060 Ti 16GB (16,311 MiB): fits</b>; headroom {head / GIB:+.2f} GiB" in page
    assert f"<td>cutoff_len</td><td>{solved['plan']['cutoff_len']}</td>" in page
    no_gpu = estimate_report(est, solved["plan"], None, 0.10)
    assert "Verdict" not in no_gpu and "GPU memory" not in json.dumps(_charts(no_gpu)["memory-bars"])


@needs_plotly
def test_batch_matrix(solved):
    page = batch_report(solved["rows"])
    ok = [r for r in solved["rows"] if r["result"]]
    bad = [r for r in solved["rows"] if not r["result"]]
    assert len(ok) == 2 and len(bad) == 1 and bad[0]["error"].startswith("no plan")
    for row in ok:
        res = row["result"]
        s = res["front"][res["recommended"]]
        assert f"time {s['time_s']:,.0f} s" in page and f"quality {s['quality']:.4f}" in page
    assert f"<b>does not fit</b> {html.escape(bad[0]['error'])}" in page
    z = _charts(page)["matrix"]["data"][0]["z"]
    assert z == [[round(r["result"]["front"][r["result"]["recommended"]]["time_s"] / 60, 2) if r["result"] else None
                  for r in solved["rows"]]]


# ---- the browser -----------------------------------------------------------------------------------------------

def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with networking off: a dead proxy and no DNS (file:// pages load; nothing else can)."""
    profile = tempfile.mkdtemp(dir=tmp)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--enable-logging=stderr",
           "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)})


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """A tiny PNG decoder (8-bit RGB/RGBA, not interlaced): (width, height, rows of raw pixel bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + n
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(b"".join(idat)), w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray(bytes(map(lambda a, b: (a + b) & 255, line, prev)))
        elif f == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif f == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp], prev[i], prev[i - bpp]) if i >= bpp else (0, prev[i], 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, rows


@pytest.mark.browser
@needs_plotly
# .ci/run installs Chromium and sets TRAINFIT_REQUIRE_BROWSER=1, so there the test runs or fails, never skips.
@pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("TRAINFIT_REQUIRE_BROWSER"),
                    reason=f"{CHROMIUM} is absent (apt-get install -y chromium)")
def test_reports_render_in_headless_chromium_offline(solved, tmp_path):
    pages = {"solve": _solve_html(solved), "estimate": _estimate_html(solved), "batch": batch_report(solved["rows"])}
    for name, page in pages.items():
        path = tmp_path / f"{name}.html"
        path.write_text(page, encoding="utf-8")
        run = _chromium(["--dump-dom", path.as_uri()], tmp_path)
        dom = run.stdout
        n = len(_charts(page))
        assert n >= 1
        assert re.search(r'<pre id="js-errors"></pre>', dom), re.search(r'<pre id="js-errors">.*?</pre>', dom, re.S)
        assert f'data-rendered="{n}"' in dom, (name, re.search(r"<body[^>]*>", dom))
        assert dom.count('class="main-svg"') >= n
        console = [ln for ln in run.stderr.splitlines() if ":CONSOLE" in ln]
        assert console == [], console
    shot = tmp_path / "solve.png"
    run = _chromium(["--window-size=1000,1400", f"--screenshot={shot}", (tmp_path / "solve.html").as_uri()], tmp_path)
    assert shot.is_file(), run.stderr[-2000:]
    w, h, rows = png_pixels(shot.read_bytes())
    assert (w, h) == (1000, 1400)
    bpp = len(rows[0]) // w
    pixels = [r[i:i + 3] for r in rows[::7] for i in range(0, len(r), 7 * bpp)]
    colors = {}
    for p in pixels:
        colors[p] = colors.get(p, 0) + 1
    assert len(colors) > 50, len(colors)  # charts: many hues, not a blank or one-colour page
    assert max(colors.values()) < 0.95 * len(pixels)


@needs_plotly
def test_solve_report_from_the_cli(tmp_path):
    """`trainfit solve --report` writes the page from the same result the table prints (one source)."""
    import json as _json

    from typer.testing import CliRunner

    from optimizer.cli import app

    out = tmp_path / "r.html"
    runner = CliRunner()
    res = runner.invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--no-write", "--report", str(out)])
    assert res.exit_code == 0, res.output
    page = out.read_text(encoding="utf-8")
    js = _json.loads(runner.invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--no-write",
                                         "--json"]).output)
    for s in js["front"]:
        assert f"{s['quality']:.4f}" in page
    again = runner.invoke(app, ["solve", "problems/qwen2.5-7b-rtx3060-12gb.yaml", "--no-write", "--report", str(out)])
    assert again.exit_code == 1 and "exists" in again.output  # never overwritten without --force
