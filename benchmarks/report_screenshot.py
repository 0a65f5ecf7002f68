"""Screenshot of the reference problem's HTML report (docs/report.png): render, open in headless Chromium offline.

Run: python benchmarks/report_screenshot.py [--out docs/report.png] [--size 1400,2400] [--html /tmp/report.html]
Needs plotly (pip install -e ".[report]") and /usr/bin/chromium (apt-get install -y chromium).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.report_html import solve_report  # noqa: E402

PROBLEM = "problems/qwen2.5-3b-rtx5060ti-16gb.yaml"
CHROMIUM = "/usr/bin/chromium"


def inputs(path: str) -> tuple:
    """solve_report's arguments for one problem file (the only function here that names internal modules)."""
    from optimizer.data.dataset import analyze_dataset, count_tokens, template_for_model
    from optimizer.data.tokens import ApproxCounter, tokenizer_family
    from optimizer.llamafactory.configs import config_files
    from optimizer.memory import estimate
    from optimizer.models.catalog import resolve_arch
    from optimizer.search.problem import load_problem
    from optimizer.search.solve import solve_problem

    problem, base = load_problem(path)
    result = solve_problem(problem, base)
    arch = resolve_arch(result.model)
    estimates = [estimate(arch, s.plan).model_dump(mode="json") for s in result.front]
    data = str(base / problem.dataset.file) if problem.dataset.file else None
    rel = os.path.relpath(path, ROOT)  # as `trainfit solve` run in the repository writes them
    files = config_files(result, problem, rel, f"configs/{problem.name}", "all", data and os.path.relpath(data, ROOT))
    configs = {str(int(name[1:3]) - 1): text for name, text in files.items() if name.startswith("p")}
    lengths = coverage = None
    if data:  # measured as build_instance measures it
        if problem.dataset.tokenizer == "approx":
            tpl = template_for_model(arch.name, arch.model_type)
            measured = count_tokens(data, template=tpl, counter=ApproxCounter(tokenizer_family(arch.name, arch.model_type, tpl)),
                                    formatting=problem.dataset.formatting)
        else:
            tok = None if problem.dataset.tokenizer == "auto" else base / problem.dataset.tokenizer
            measured = analyze_dataset(data, model=arch.name, model_type=arch.model_type, tokenizer=tok,
                                       formatting=problem.dataset.formatting)
        lengths = sorted(s.total for s in measured.samples)
        coverage = {c: measured.coverage(c).response_kept_share for c in problem.search.cutoff_len}
    return result.model_dump(mode="json"), estimates, configs, lengths, coverage


def screenshot(html_path: Path, png: Path, size: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=10000", "--hide-scrollbars",
               f"--window-size={size}", f"--screenshot={png}", html_path.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default=str(ROOT / PROBLEM))
    ap.add_argument("--out", default=str(ROOT / "docs" / "report.png"))
    ap.add_argument("--size", default="1400,2400", help="window width,height in pixels")
    ap.add_argument("--html", default=None, help="also keep the HTML here")
    args = ap.parse_args()
    page = solve_report(*inputs(args.problem))
    with tempfile.TemporaryDirectory() as tmp:
        html_path = Path(args.html) if args.html else Path(tmp) / "report.html"
        html_path.write_text(page, encoding="utf-8")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(html_path, out, args.size)
    print(f"{out}: screenshot ({args.size}) of the report of {args.problem} ({len(page):,} bytes of HTML)")


if __name__ == "__main__":
    main()
