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

from optimizer.report_html import solve_page  # noqa: E402

PROBLEM = "problems/qwen2.5-3b-rtx5060ti-16gb.yaml"
CHROMIUM = "/usr/bin/chromium"


def page_for(path: str) -> str:
    """The page `trainfit solve PROBLEM --report` writes, for one problem file."""
    from optimizer.llamafactory.configs import config_files
    from optimizer.search.problem import load_problem
    from optimizer.search.solve import solve_problem

    problem, base = load_problem(path)
    result = solve_problem(problem, base)
    data = str(base / problem.dataset.file) if problem.dataset.file else None
    rel = os.path.relpath(path, ROOT)  # as `trainfit solve` run in the repository writes them
    files = config_files(result, problem, rel, f"configs/{problem.name}", "all", data and os.path.relpath(data, ROOT))
    return solve_page(result, files)


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
    page = page_for(args.problem)
    with tempfile.TemporaryDirectory() as tmp:
        html_path = Path(args.html) if args.html else Path(tmp) / "report.html"
        html_path.write_text(page, encoding="utf-8")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(html_path, out, args.size)
    print(f"{out}: screenshot ({args.size}) of the report of {args.problem} ({len(page):,} bytes of HTML)")


if __name__ == "__main__":
    main()
