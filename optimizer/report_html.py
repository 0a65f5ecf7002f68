"""Self-contained HTML reports: the solve front, one estimate, a batch matrix. Pure: JSON-like dicts in, a string out.

The inputs are `model_dump(mode="json")` of the library's pydantic models (SolveResult, Estimate, PhasePeak, Plan,
GpuSpec), so this module depends on their field names only, never on the modules that define them. Plotly's
JavaScript is inlined: the page opens from disk and makes no network request. Same input, same bytes: explicit
div ids, sorted JSON keys, no timestamps.
"""

from __future__ import annotations

import html
import json
from typing import Any

from .errors import TrainfitError
from .memory import budget_bytes
from .units import GIB, MIB

__all__ = ["solve_report", "solve_page", "estimate_report", "batch_report", "ReportDependencyError", "PLOTLY_MISSING"]

PLOTLY_MISSING = 'the HTML report needs plotly. Install it: pip install -e ".[report]"'

# Marker symbol per finetuning_type (the front chart's legend).
SYMBOLS = {"lora": "circle", "qlora4": "diamond", "qlora8": "square", "full": "triangle-up"}
# Term colours, assigned in order of first appearance (Plotly's D3 and Dark24-like hues; deterministic).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
           "#31a354", "#756bb1", "#636363", "#9c9ede", "#e7969c", "#cedb9c"]
CACHE_TERM = "allocator cache (reserved - allocated)"
CONTEXT_TERM = "CUDA context (device - reserved)"


class ReportDependencyError(TrainfitError):
    """plotly is not installed; the message says how to install it."""


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise ReportDependencyError(PLOTLY_MISSING) from None
    return go, get_plotlyjs


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _gib(n: int | float) -> float:
    """Bytes to GiB, unrounded: the charts' stacks add up to the byte totals (display rounds with :.2f)."""
    return n / GIB


def _dur(seconds: float) -> str:
    m = seconds / 60
    return f"{seconds:,.0f} s ({m / 60:.1f} h)" if m >= 120 else f"{seconds:,.0f} s ({m:.1f} min)"


def _kind(s: dict) -> str:
    if s["finetuning_type"] == "full":
        return "full"
    return f"{s['finetuning_type']} r{s['lora_rank']} {s['lora_target']}"


def _summary(i: int, s: dict) -> str:
    """One line for a front point (hover text, matrix cells)."""
    return (f"#{i + 1} {_kind(s)}, cutoff {s['cutoff_len']}, batch {s['per_device_train_batch_size']}"
            f"x{s['gradient_accumulation_steps']}, GC {'on' if s['gradient_checkpointing'] else 'off'}, {s['optim']}"
            f"{', liger' if s['enable_liger_kernel'] else ''}, {s['num_train_epochs']:g} epochs")


def _terms(phase: dict) -> dict[str, tuple[int, str]]:
    """name -> (bytes, detail) of one phase; a name listed twice is summed."""
    out: dict[str, tuple[int, str]] = {}
    for t in phase["terms"]:
        b, d = out.get(t["name"], (0, ""))
        out[t["name"]] = (b + t["bytes"], d or t.get("detail", ""))
    return out


def _peak(est: dict) -> dict:
    return next(p for p in est["phases"] if p["phase"] == est["peak_phase"])


def _colors(estimates: list[dict], extra: list[dict] = ()) -> dict[str, str]:
    """One colour per term name for the whole page, in order of first appearance over every phase."""
    names = dict.fromkeys(t["name"] for est in estimates for p in [*est["phases"], *extra] for t in p["terms"])
    colors = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    colors[CACHE_TERM], colors[CONTEXT_TERM] = "#c7c7c7", "#525252"
    return colors


def _chart(div_id: str, fig, height: int = 460) -> str:
    spec = fig.to_plotly_json()
    spec["layout"].setdefault("height", height)
    payload = json.dumps({"data": spec["data"], "layout": spec["layout"]}, sort_keys=True, separators=(",", ":"),
                         default=_json_default)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<div id="{_e(div_id)}" class="chart"></div>\n<script>trainfitPlot("{_e(div_id)}", {payload});</script>'


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _layout(title: str, **kw) -> dict:
    return {"title": {"text": title}, "template": "plotly_white", "margin": {"l": 70, "r": 30, "t": 60, "b": 60},
            "font": {"size": 13}, **kw}


def _hline(y: float, text: str, color: str, dash: str) -> tuple[dict, dict]:
    shape = {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
             "line": {"color": color, "dash": dash}}
    note = {"xref": "paper", "x": 1, "y": y, "text": text, "showarrow": False, "xanchor": "right", "yanchor": "bottom",
            "font": {"color": color}}
    return shape, note


def _stack_traces(go, columns: list[str], stacks: list[dict[str, tuple[int, str]]], colors: dict[str, str]) -> list:
    """One Bar trace per term; `stacks[j]` holds the terms of column j (bytes, detail)."""
    traces = []
    for name in colors:
        ys = [_gib(st.get(name, (0, ""))[0]) for st in stacks]
        if not any(ys):
            continue
        text = [f"{name}: {st[name][0] / MIB:,.1f} MiB<br>{_e(st[name][1])}" if name in st else "" for st in stacks]
        traces.append(go.Bar(name=name, x=columns, y=ys, marker={"color": colors[name]}, hovertext=text,
                             hoverinfo="text+x"))
    return traces


def _memory_bars(go, labels: list[str], estimates: list[dict], gpu_total: int | None, budget: int | None,
                 colors: dict[str, str]) -> str:
    """Per column a stacked bar of the peak phase's terms, then allocator cache and CUDA context: the device peak."""
    stacks = []
    for est in estimates:
        st = _terms(_peak(est))
        st[CACHE_TERM] = (est["peak_reserved_bytes"] - est["peak_allocated_bytes"], "caching-allocator segments")
        st[CONTEXT_TERM] = (est["device_peak_bytes"] - est["peak_reserved_bytes"], "CUDA context")
        stacks.append(st)
    shapes, notes = [], []
    for y, text, color, dash in ((gpu_total, "GPU memory", "#d62728", "solid"),
                                  (budget, "bound (margin)", "#ff7f0e", "dash")):
        if y is not None:
            s, n = _hline(_gib(y), f"{text} {_gib(y):.2f} GiB", color, dash)
            shapes.append(s)
            notes.append(n)
    fig = go.Figure(_stack_traces(go, labels, stacks, colors), layout=_layout(
        "Device peak by term (the peak phase's buffers + allocator cache + CUDA context)", barmode="stack",
        yaxis={"title": {"text": "GiB"}}, shapes=shapes, annotations=notes, legend={"traceorder": "reversed"}))
    return _chart("memory-bars", fig, 520)


def _step(go, est: dict, eval_phase: dict | None, div_id: str, colors: dict[str, str]) -> str:
    """Stacked allocated memory of each phase of one step (and evaluation), the peak moment named."""
    phases = list(est["phases"]) + ([eval_phase] if eval_phase else [])
    columns = [p["phase"] for p in phases]
    stacks = [_terms(p) for p in phases]
    peak = _peak(est)
    top = max(sum(b for b, _ in st.values()) for st in stacks)
    notes = [{"x": p["phase"], "y": _gib(sum(b for b, _ in st.values())), "yanchor": "bottom", "showarrow": False,
              "text": f"{_gib(sum(b for b, _ in st.values())):.2f} GiB"} for p, st in zip(phases, stacks)]
    notes.append({"x": peak["phase"], "y": _gib(top) * 1.08, "yanchor": "bottom", "showarrow": False,
                  "text": f"<b>peak</b>: {_e(peak['moment'])}", "font": {"color": "#d62728"}})
    fig = go.Figure(_stack_traces(go, columns, stacks, colors), layout=_layout(
        "Allocated memory over one step, phase by phase", barmode="stack", annotations=notes,
        legend={"traceorder": "reversed"},
        yaxis={"title": {"text": "GiB allocated"}, "range": [0, _gib(top) * 1.2]}))
    return _chart(div_id, fig, 520)


def _front(go, result: dict) -> str:
    front = result["front"]
    traces = [go.Scatter(name="front", x=[s["time_s"] / 60 for s in front], y=[s["quality"] for s in front],
                         mode="lines", line={"color": "#bbbbbb", "width": 1}, hoverinfo="skip", showlegend=False)]
    for kind in sorted({s["finetuning_type"] for s in front}, key=list(SYMBOLS).index):
        idx = [i for i, s in enumerate(front) if s["finetuning_type"] == kind]
        # legend entry with a plain colour (a legend item of a coloraxis trace gets an invalid colour in plotly.js)
        traces.append(go.Scatter(name=kind, mode="markers", x=[None], y=[None], legendgroup=kind, hoverinfo="skip",
                                 marker={"symbol": SYMBOLS.get(kind, "circle"), "size": 13, "color": "#999999"}))
        traces.append(go.Scatter(
            name=kind, legendgroup=kind, showlegend=False, mode="markers+text",
            x=[front[i]["time_s"] / 60 for i in idx], y=[front[i]["quality"] for i in idx],
            text=[f"#{i + 1}" for i in idx], textposition="top center", textfont={"color": "#333333"},
            hovertext=[f"{_e(_summary(i, front[i]))}<br>device peak {_gib(front[i]['device_peak_bytes']):.2f} GiB, "
                       f"headroom {_gib(front[i]['headroom_bytes']):.2f} GiB<br>time {_dur(front[i]['time_s'])}, "
                       f"quality {front[i]['quality']:.4f}" for i in idx], hoverinfo="text",
            marker={"symbol": SYMBOLS.get(kind, "circle"), "size": 13,
                    "color": [_gib(front[i]["headroom_bytes"]) for i in idx],
                    "coloraxis": "coloraxis", "line": {"color": "#333333", "width": 1}}))
    r = result["recommended"]
    rec = front[r]
    traces.append(go.Scatter(name=f"recommended (#{r + 1})", mode="markers", x=[rec["time_s"] / 60], y=[rec["quality"]],
                             hoverinfo="skip", marker={"symbol": "star-open", "size": 28, "color": "#d62728",
                                                       "line": {"width": 2}}))
    fig = go.Figure(traces, layout=_layout(
        "Pareto front: quality vs training time (colour: headroom; symbol: method)",
        xaxis={"title": {"text": "training time (min)"}}, yaxis={"title": {"text": "quality score"}},
        coloraxis={"colorscale": "RdYlGn", "cmin": 0, "colorbar": {"title": {"text": "headroom GiB"}, "x": 1.02}},
        legend={"x": 0, "y": -0.18, "orientation": "h"}))
    return _chart("front", fig, 520)


def _lengths(go, lengths: list[int] | None, coverage: dict[int, float] | None) -> str:
    cov = sorted((int(c), float(v)) for c, v in (coverage or {}).items())
    if lengths:
        hi = max(max(lengths), max((c for c, _ in cov), default=0))
        width = max(1, -(-hi // 40))
        counts = [0] * (-(-hi // width) + 1)
        for n in lengths:
            counts[n // width] += 1
        traces = [go.Bar(name="samples", x=[(k + 0.5) * width for k in range(len(counts))], y=counts, width=width,
                         marker={"color": "#4c78a8"}, hovertext=[f"{k * width}-{(k + 1) * width - 1} tokens: {c}"
                                                                  for k, c in enumerate(counts)], hoverinfo="text")]
        shapes = [{"type": "line", "x0": c, "x1": c, "yref": "paper", "y0": 0, "y1": 1,
                   "line": {"color": "#d62728", "dash": "dot"}} for c, _ in cov]
        notes = [{"x": c, "yref": "paper", "y": 1 - 0.07 * (k % 3), "text": f"{c}: {100 * v:.1f}%", "showarrow": False,
                  "xanchor": "left", "font": {"color": "#d62728"}} for k, (c, v) in enumerate(cov)]
        title = (f"Token length per sample ({len(lengths)} samples); dotted: cutoff_len candidates with the share of "
                 "response tokens kept")
        fig = go.Figure(traces, layout=_layout(title, shapes=shapes, annotations=notes, bargap=0,
                                               xaxis={"title": {"text": "tokens (prompt + response, chat template)"}},
                                               yaxis={"title": {"text": "samples"}}))
    else:
        fig = go.Figure([go.Bar(name="coverage", x=[str(c) for c, _ in cov], y=[100 * v for _, v in cov],
                                text=[f"{100 * v:.1f}%" for _, v in cov], marker={"color": "#4c78a8"})],
                        layout=_layout("Share of response tokens kept per cutoff_len (from the data summary)",
                                       xaxis={"title": {"text": "cutoff_len"}}, yaxis={"title": {"text": "%"}}))
    return _chart("lengths", fig)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'


_CSS = """body{font-family:system-ui,sans-serif;margin:24px auto;padding:0 16px;max-width:1320px;color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}.chart{width:100%}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:nth-child(2),td:nth-child(3){text-align:left}tr.rec{background:#fff3cd}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:.85em}button{margin:4px 0}
.fits{background:#e2f5e2}.nofit{background:#fbe3e3}.matrix td,.matrix th{text-align:left;vertical-align:top}
#js-errors{color:#b00;background:#fee}#js-errors:empty{display:none}"""

_JS = """window.trainfitErrors=0;
function trainfitError(m){window.trainfitErrors+=1;\
var e=document.getElementById("js-errors");if(e){e.textContent+=m+"\\n";}}
window.onerror=function(m,s,l,c){trainfitError("error: "+m+" at "+l+":"+c);};
window.addEventListener("unhandledrejection",function(ev){trainfitError("rejection: "+ev.reason);});
function trainfitPlot(id,fig){try{Plotly.newPlot(id,fig.data,fig.layout,{displaylogo:false,responsive:true}).then(
function(){var b=document.body;b.setAttribute("data-rendered",String(Number(b.getAttribute("data-rendered")||0)+1));},
function(e){trainfitError("plot "+id+": "+e);});}catch(e){trainfitError("plot "+id+": "+e);}}
function trainfitCopy(id,btn){var t=document.getElementById(id).textContent;function done(){btn.textContent="copied";}
function old(){var a=document.createElement("textarea");a.value=t;document.body.appendChild(a);a.select();
try{document.execCommand("copy");done();}catch(e){}document.body.removeChild(a);}
if(navigator.clipboard){navigator.clipboard.writeText(t).then(done,old);}else{old();}}"""


def _page(title: str, body: list[str]) -> str:
    _, get_plotlyjs = _plotly()
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>", f"<script>{_JS}</script>", f"<script>{get_plotlyjs()}</script>", "</head><body>",
        '<pre id="js-errors"></pre>', *body,
        "<p><small>trainfit HTML report: self-contained, no network requests.</small></p>", "</body></html>", "",
    ])


def solve_report(result: dict, estimates: list[dict], configs: dict[str, str], lengths: list[int] | None,
                 coverage: dict[int, float] | None) -> str:
    """The solve result's page. `estimates[i]` and `configs[str(i)]` belong to `result["front"][i]`."""
    go, _ = _plotly()
    front, r = result["front"], result["recommended"]
    if len(estimates) != len(front):
        raise ValueError(f"{len(estimates)} estimates for {len(front)} front points")
    proof = "proven optimal" if result["proven_optimal"] else "not proven optimal (time limit hit)"
    body = [
        f"<h1>{_e(result['problem'])}: {_e(result['model'])} on {_e(result['gpu'])}</h1>",
        f"<p>GPU memory {_gib(result['gpu_total_bytes']):.2f} GiB; "
        f"device-peak bound {_gib(result['budget_bytes']):.2f} "
        f"GiB (margin {100 * result['margin']:.0f}%). Front: {len(front)} points, "
        f"{_e(proof)} ({_e(result['method'])}), "
        f"{result['evaluated_plans']:,} plans evaluated by the memory model; "
        f"{result['num_samples']:,} training samples.</p>",
        f"<p><b>Recommended: #{r + 1}</b> {_e(_summary(r, front[r]))}. {_e(result['why'])}.</p>",
        "<h2>Pareto front</h2>", _front(go, result),
    ]
    rows = []
    for i, s in enumerate(front):
        rows.append([str(i + 1), _e(", ".join(s["labels"])), _e(_kind(s)), str(s["cutoff_len"]),
                     f"{s['per_device_train_batch_size']}x{s['gradient_accumulation_steps']}",
                     _e(s["max_samples"] if s["max_samples"] is not None else "all"), f"{s['num_train_epochs']:g}",
                     "on" if s["gradient_checkpointing"] else "off", _e(s["flash_attn"]), _e(s["optim"]),
                     "on" if s["enable_liger_kernel"] else "off", f"{_gib(s['device_peak_bytes']):.2f}",
                     f"{_gib(s['headroom_bytes']):.2f}", _dur(s["time_s"]), f"{s['quality']:.4f}"])
    table = _table(["#", "pick", "method", "cutoff", "batch", "samples", "epochs", "GC", "attn", "optim", "liger",
                    "device peak GiB", "headroom GiB", "time", "quality"], rows, "front")
    body.append(table.replace(f"<tr><td>{r + 1}</td>", f'<tr class="rec"><td>{r + 1}</td>', 1))
    colors = _colors(estimates)
    body += ["<h2>Memory of each front point</h2>",
             _memory_bars(go, [f"#{i + 1}" for i in range(len(front))], estimates, result["gpu_total_bytes"],
                          result["budget_bytes"], colors),
             f"<h2>The recommended config (#{r + 1}) over one step</h2>", _step(go, estimates[r], None, "step", colors)]
    if lengths or coverage:
        body += ["<h2>Data: token lengths and cutoff_len</h2>", _lengths(go, lengths, coverage)]
    body.append("<h2>What bound the search</h2>")
    body.append("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in result["notes"]) + "</ul>" if result["notes"] else
                "<p>No notes.</p>")
    dims = ["finetuning_type", "lora_rank", "lora_target", "cutoff_len", "per_device_train_batch_size",
            "gradient_accumulation_steps", "max_samples", "num_train_epochs", "gradient_checkpointing", "flash_attn",
            "optim", "enable_liger_kernel"]
    body.append("<p>Values each dimension takes on the front:</p>" + _table(["dimension", "values"], [
        [_e(d), _e(", ".join("all" if v is None else str(v) for v in dict.fromkeys(s[d] for s in front)))]
        for d in dims]))
    body.append("<h2>Configs (LLaMA-Factory YAML)</h2>")
    for i, s in enumerate(front):
        text = configs.get(str(i))
        est_notes = "".join(f"<li>{_e(n)}</li>" for n in estimates[i].get("notes", []))
        inner = (f'<button onclick="trainfitCopy(\'yaml-{i + 1}\', this)">copy</button>'
                 f'<pre id="yaml-{i + 1}">{_e(text)}</pre>'
                 if text is not None else "<p>No config written for this point.</p>")
        body.append(f"<details{' open' if i == r else ''}><summary>{_e(_summary(i, s))}"
                    f"{' (' + _e(', '.join(s['labels'])) + ')' if s['labels'] else ''}</summary>{inner}"
                    f"{'<ul>' + est_notes + '</ul>' if est_notes else ''}</details>")
    return _page(f"trainfit: {result['problem']}", body)


def estimate_report(estimate: dict, plan: dict, gpu: dict | None, margin: float, eval_phase: dict | None = None) -> str:
    """One config's page: its device peak by term against the GPU, and its memory over the step."""
    go, _ = _plotly()
    total = gpu["memory_mib"] * MIB if gpu else None
    budget = budget_bytes(total, margin) if total else None
    body = [f"<h1>{_e(estimate['arch'])}: one training step</h1>",
            f"<p>trainable params: {estimate['trainable_params']:,} || all params: {estimate['all_params']:,}; "
            f"tokens per micro-batch {estimate['tokens_per_micro_batch']:,}.</p>",
            f"<p>peak allocated {_gib(estimate['peak_allocated_bytes']):.2f} GiB, peak reserved "
            f"{_gib(estimate['peak_reserved_bytes']):.2f} GiB, "
            f"device peak {_gib(estimate['device_peak_bytes']):.2f} GiB "
            f"in phase {_e(estimate['peak_phase'])} ({_e(_peak(estimate)['moment'])}).</p>"]
    if gpu:
        # `eval_phase` may carry the evaluation pass's "device_peak_bytes" (check's eval_device_peak_bytes)
        head = total - max(estimate["device_peak_bytes"], (eval_phase or {}).get("device_peak_bytes", 0))
        word = "does not fit" if head < 0 else ("fits" if head >= margin * total else
                                                f"fits, but with less than the {100 * margin:.0f}% margin")
        body.append(f"<p><b>Verdict on {_e(gpu['name'])} ({gpu['memory_mib']:,} MiB): {_e(word)}</b>; headroom "
                    f"{head / GIB:+.2f} GiB.</p>")
    colors = _colors([estimate], [eval_phase] if eval_phase else [])
    body += ["<h2>Device peak by term</h2>", _memory_bars(go, ["this config"], [estimate], total, budget, colors),
             "<h2>Memory over one step</h2>", _step(go, estimate, eval_phase, "step", colors), "<h2>Plan</h2>",
             _table(["key", "value"], [[_e(k), _e(v)] for k, v in sorted(plan.items())])]
    if estimate.get("notes"):
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in estimate["notes"]) + "</ul>")
    return _page(f"trainfit: {estimate['arch']}", body)


def batch_report(rows: list[dict]) -> str:
    """models x GPUs. Each row: {"model", "gpu", "result": SolveResult dump or None, "error": str or None}."""
    go, _ = _plotly()
    models = list(dict.fromkeys(row["model"] for row in rows))
    gpus = list(dict.fromkeys(row["gpu"] for row in rows))
    cell = {(row["model"], row["gpu"]): row for row in rows}
    grid, z, hover = [], [], []
    for m in models:
        line, zs, hs = [_e(m)], [], []
        for g in gpus:
            row = cell.get((m, g))
            res = row.get("result") if row else None
            if res:
                s = res["front"][res["recommended"]]
                line.append(f'<div class="fits"><b>fits</b> {_e(_summary(res["recommended"], s))}<br>device peak '
                            f"{_gib(s['device_peak_bytes']):.2f} / {_gib(res['gpu_total_bytes']):.2f} GiB; time "
                            f"{_dur(s['time_s'])}; quality {s['quality']:.4f}</div>")
                zs.append(round(s["time_s"] / 60, 2))
                hs.append(f"{_e(m)} on {_e(g)}<br>{_e(_kind(s))}, cutoff {s['cutoff_len']}<br>{_dur(s['time_s'])}")
            else:
                err = (row or {}).get("error") or "not solved"
                word = "does not fit" if err.startswith("no plan") else "error"
                line.append(f'<div class="nofit"><b>{word}</b> {_e(err)}</div>')
                zs.append(None)
                hs.append(f"{_e(m)} on {_e(g)}: {word}")
        grid.append(line)
        z.append(zs)
        hover.append(hs)
    text = [[f"{v:.1f} min" if v is not None else "does not fit" for v in zs] for zs in z]
    fig = go.Figure([go.Heatmap(z=z, x=gpus, y=models, hovertext=hover, hoverinfo="text", colorscale="Viridis",
                                text=text, texttemplate="%{text}", colorbar={"title": {"text": "min"}},
                                xgap=2, ygap=2)],
                    layout=_layout("Training time of the recommended config (blank: does not fit)",
                                   yaxis={"autorange": "reversed"}, margin={"l": 260, "r": 30, "t": 60, "b": 80}))
    body = ["<h1>trainfit batch: models x GPUs</h1>",
            f"<p>{len(rows)} problems; {sum(1 for row in rows if row.get('result'))} fit.</p>",
            _table(["model", *gpus], grid, "matrix"), "<h2>Training time</h2>",
            _chart("matrix", fig, 220 + 60 * len(models))]
    return _page("trainfit batch", body)


def solve_page(result: Any, config_texts: dict[str, str]) -> str:
    """The solve page from the library's objects: a SolveResult and the files `llamafactory.configs.config_files`
    made for every front point (`pNN_...yaml`, NN = the point's number). Each point's memory by term is the memory
    model's own estimate of its plan (one source with the CLI's figures)."""
    from .memory import estimate
    from .models.catalog import resolve_arch

    if any(s.num_gpus > 1 for s in result.front):
        raise TrainfitError("--report covers one GPU for now; this front has multi-GPU points. Drop --report (the "
                            "table, --json and the configs' headers give the per-GPU figures).")
    arch = resolve_arch(result.model)
    estimates = [estimate(arch, s.plan).model_dump(mode="json") for s in result.front]
    configs = {str(int(name.split("_")[0][1:]) - 1): text for name, text in config_texts.items()
               if name.startswith("p") and name.endswith(".yaml")}
    return solve_report(result.model_dump(mode="json"), estimates, configs, result.data_lengths,
                        result.cutoff_coverage)
