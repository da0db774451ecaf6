"""The Compare tab: one prompt on several backends and schemes in turn, answers side by side, a one-line verdict per
run, charts of every run of the session, the recorded GPU measurements beside the live columns, and why INT8 is or
is not faster on this CPU."""

from __future__ import annotations

import csv
import dataclasses
import functools
import re
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from models.registry import DEFAULT_MODEL
from serving.service import (
    BACKENDS,
    CHAT_DEFAULTS,
    ChatSettings,
    backend_availability,
    backend_label,
    backend_schemes,
)
from ui import recorded, shared
from ui.chat import friendly_error, metrics_line
from ui.text import scheme_summary

COLUMNS = [
    "run", "time", "backend", "scheme", "engine", "model", "prompt", "prompt_tokens", "generated_tokens",
    "ttft_ms", "tpot_ms", "tokens_per_s", "finish",
]  # fmt: skip
METRICS = (("ttft_ms", "Time to first token (ms)"), ("tpot_ms", "ms per output token"), ("tokens_per_s", "tokens/s"))
NUMERIC = {"run": "int64", "prompt_tokens": "int64", "generated_tokens": "int64"} | {k: "float64" for k, _ in METRICS}
BAR_RUNS = 3  # the bar charts show the latest runs; the run plot and the CSV keep them all
PALETTE = ("#2563eb", "#f97316", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777", "#4b5563")
RECORDED_COLORS = ("#94a3b8", "#64748b", "#475569", "#334155")


def engine_label(backend: str, scheme: str) -> str:
    """What a bar, a point and the verdict call a backend running a scheme: 'CPU w8a8-int8'."""
    return f"{backend_label(backend)} {scheme}"


def frame(rows: list[dict]) -> pd.DataFrame:
    """Numeric columns typed as numbers even when empty, so the plots draw bars and points, not categories."""
    return pd.DataFrame(rows, columns=COLUMNS).astype(NUMERIC)


def recorded_rows(model: str) -> list[dict]:
    """The recorded GPU runs of the page's model as bars (only the embedded model has them)."""
    if model != DEFAULT_MODEL:
        return []
    return [
        {"bar": r.label, "engine": r.label, "tpot_ms": r.tpot_ms, "tokens_per_s": r.tokens_per_s}
        for r in recorded.embedded()
    ]


def color_map(rows: list[dict], extra: list[dict]) -> dict[str, str]:
    """One color per engine label, in order of first appearance; recorded bars in grays.

    A changed color map also makes Gradio rebuild the chart: a native plot with ``color=`` fixes its color domain
    when it is first drawn, so rows with new labels would otherwise stay invisible (the "charts draw nothing" bug)."""
    colors: dict[str, str] = {}
    for row in rows:
        colors.setdefault(row["engine"], PALETTE[len(colors) % len(PALETTE)])
    for i, row in enumerate(extra):
        colors.setdefault(row["engine"], RECORDED_COLORS[i % len(RECORDED_COLORS)])
    return colors


def bar_plots(rows: list[dict], model: str) -> list[dict]:
    """Updates for the three bar charts: the latest BAR_RUNS runs, one bar per run and engine."""
    runs = sorted({r["run"] for r in rows})[-BAR_RUNS:]
    latest = [r for r in rows if r["run"] in runs]
    bars = [{**r, "bar": f"#{r['run']} {r['engine']}"} for r in latest]
    gpu = recorded_rows(model)
    colors = color_map(rows, gpu)
    updates = []
    for key, _ in METRICS:
        data = bars + [g for g in gpu if key in g]
        table = pd.DataFrame(
            [{"bar": d["bar"], "engine": d["engine"], key: float(d[key])} for d in data],
            columns=["bar", "engine", key],
        ).astype({key: "float64"})
        caption = f"runs {runs[0]}-{runs[-1]}" if len(runs) > 1 else f"run {runs[0]}" if runs else ""
        if key != "ttft_ms" and gpu:
            caption += " · gray bars: recorded GPU runs (bench/results), not live"
        updates.append(gr.update(value=table, color_map=colors, sort=[d["bar"] for d in data], caption=caption or None))
    return updates


def timeline(rows: list[dict]) -> dict:
    """tokens/s of every run of the session, one point per engine and run (integer run labels, not 1.5)."""
    data = pd.DataFrame(
        [{"run": f"run {r['run']}", "engine": r["engine"], "tokens_per_s": float(r["tokens_per_s"])} for r in rows],
        columns=["run", "engine", "tokens_per_s"],
    ).astype({"tokens_per_s": "float64"})
    order = list(dict.fromkeys(data["run"]))
    return gr.update(value=data, color_map=color_map(rows, []), sort=order)


def verdict(run: int, rows: list[dict], model: str) -> str:
    """One line: which engine of this run is faster and by how much (tokens/s), with TTFTs."""
    mine = sorted((r for r in rows if r["run"] == run and r["tokens_per_s"] > 0), key=lambda r: -r["tokens_per_s"])
    if not mine:
        return f"**Run {run}:** nothing finished."
    best = mine[0]
    if len(mine) == 1:
        line = (
            f"**Run {run}:** {best['engine']} alone: {best['tokens_per_s']:.1f} tokens/s, "
            f"TTFT {best['ttft_ms']:.0f} ms (pick two or more backends to compare)."
        )
    else:
        others = mine[1:]
        times = ", ".join(f"{best['tokens_per_s'] / o['tokens_per_s']:.1f}× faster than {o['engine']}" for o in others)
        speeds = " vs ".join(f"{r['tokens_per_s']:.1f}" for r in mine)
        ttfts = " vs ".join(f"{r['ttft_ms']:.0f}" for r in mine)
        line = f"**Run {run}: {best['engine']} is {times}** (tokens/s {speeds}; TTFT {ttfts} ms)."
    gpu = {r.scheme: r for r in recorded.embedded()} if model == DEFAULT_MODEL else {}
    if gpu:
        fastest = min(gpu.values(), key=lambda r: r.tpot_ms)
        line += (
            f" Recorded, not live: the GPU engine on an {fastest.device} decodes this model at "
            f"{fastest.tokens_per_s:.0f} tokens/s ({fastest.scheme}), "
            f"{fastest.tokens_per_s / best['tokens_per_s']:.0f}× {best['engine']}."
        )
    return line


@functools.cache
def cpu_isa() -> tuple[str, str]:
    """(CPU model name, its INT8 matrix instructions: 'AMX', 'AVX-512 VNNI' or 'none')."""
    from cpu_backend.threads import cpu_model_and_flags

    name, flags = cpu_model_and_flags()
    name = name or "this CPU"
    try:
        import torch

        amx, vnni = torch.cpu._is_amx_tile_supported(), torch.cpu._is_vnni_supported()
    except (ImportError, AttributeError):
        amx, vnni = "amx_int8" in flags, "avx512_vnni" in flags
    return name, "AMX" if amx else "AVX-512 VNNI" if vnni else "none"


def isa_note() -> str:
    name, isa = cpu_isa()
    why = {
        "AMX": "8-bit integer products run on AMX tiles (prefill) and VNNI dot products (decode), and an INT8 weight "
        "is half the bytes of a 16-bit one, so INT8 schemes should beat the unquantized model in TTFT and tokens/s.",
        "AVX-512 VNNI": "8-bit integer dot products run on AVX-512 VNNI (no AMX tiles): decode reads half the bytes, "
        "so INT8 tokens/s should beat the unquantized model; prefill gains less than on an AMX CPU.",
        "none": "no VNNI or AMX: 8-bit integer products are widened to ordinary vector math, so INT8 saves memory "
        "but may not be faster than the unquantized model here.",
    }[isa]
    return f"**This CPU:** {name} — INT8 instructions: **{isa}**. {why}"


def csv_file(rows: list[dict], session: str) -> str:
    """This session's measurements as a CSV file for the download button."""
    folder = Path(tempfile.gettempdir()) / "q8chat-compare"
    folder.mkdir(exist_ok=True)
    path = folder / f"q8chat-measurements-{re.sub(r'[^A-Za-z0-9_-]', '', session)[:40] or 'local'}.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def live_backends() -> list[str]:
    return [name for name in BACKENDS if backend_availability(name)[0]]


def compare(prompt, chosen, model, system, max_new, schemes, rows, verdicts, request: gr.Request):
    """One prompt on each chosen backend in turn (never two at once, so the timings are fair), answers streamed into
    their columns; then the verdict, the charts and the CSV. Stop ends the running column and skips the rest.

    Yields (answer per live backend..., verdicts, bars per metric..., timeline, rows, verdicts state, csv)."""
    names = live_backends()
    rows, verdicts = list(rows or []), list(verdicts or [])
    session = getattr(request, "session_hash", None) or "local"
    answers = {name: "" for name in names}
    keep = [gr.skip()] * (len(METRICS) + 5)

    def out(final: bool = False):
        cols = [answers[name] for name in names]
        if not final:
            return (*cols, *keep)
        return (
            *cols, "\n\n".join(verdicts), *bar_plots(rows, model), timeline(rows), rows, verdicts,
            csv_file(rows, session) if rows else None,
        )  # fmt: skip

    chosen = [name for name in names if name in (chosen or [])]
    if not chosen:
        answers = {name: "*pick at least one backend above*" for name in names}
        yield out()
        return
    run = 1 + max((r["run"] for r in rows), default=0)
    cancel = shared.new_cancel(request)
    # every backend prefills the whole prompt (no KV cache reuse) and decodes greedily: TTFTs and answers that compare
    params = dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=int(max_new), temperature=0.0, cache_prompt=False)
    for name in names:
        if name not in chosen:
            answers[name] = "*not selected*"
            continue
        if cancel.is_set():
            answers[name] = "*stopped before it started*"
            yield out()
            continue
        scheme = (schemes or {}).get(name) or backend_schemes(name)[0]
        update = None
        try:
            shared.warmup.check(name, scheme)
            answers[name] = f"*{engine_label(name, scheme)}: reading the prompt…*"
            yield out()
            for update in shared.service.chat(
                prompt, [], ChatSettings(name, model, scheme, system or "", params), cancel
            ):
                answers[name] = update.text
                yield out()
        except Exception as e:  # noqa: BLE001 - shown in the backend's column
            answers[name] = f"**Cannot answer:** {friendly_error(e)}"
            yield out()
            continue
        if update is None or update.timings is None:
            continue
        answers[name] = f"{update.text}\n\n{metrics_line(update)}"
        t = update.timings
        rows.append(
            {
                "run": run,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "backend": backend_label(name),
                "scheme": update.scheme,
                "engine": engine_label(name, update.scheme),
                "model": model,
                "prompt": prompt.strip(),
                "prompt_tokens": t.prompt_tokens,
                "generated_tokens": t.generated_tokens,
                "ttft_ms": round(t.ttft_ms, 2),
                "tpot_ms": round(t.tpot_ms, 3),
                "tokens_per_s": round(t.tokens_per_s, 2),
                "finish": update.finish_reason,
            }
        )
        yield out()
    if any(r["run"] == run for r in rows):
        verdicts.insert(0, verdict(run, rows, model))
    yield out(final=True)


def stop(request: gr.Request):
    shared.stop(request)


def build(model: gr.Dropdown, system: gr.Textbox, capacity: int = 1) -> None:
    names = live_backends()
    missing = [name for name in BACKENDS if name not in names]
    gr.Markdown(
        "One prompt on every chosen backend in turn (greedy, whole prompt read cold, so answers and times compare). "
        "Every run of this session stays in the charts and the CSV."
    )
    with gr.Row():
        prompt = gr.Textbox(
            value="Explain in two sentences why the sky is blue.", label="Prompt", scale=6, elem_id="compare-prompt"
        )
        with gr.Column(scale=2, min_width=220):
            chosen = gr.CheckboxGroup(
                [(backend_label(n), n) for n in names], value=names, label="Backends", elem_id="compare-backends"
            )
            max_new = gr.Slider(8, 512, value=64, step=8, label="Max new tokens", elem_id="compare-max-new")
    with gr.Row():
        run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    if missing:
        gr.Markdown(
            "Not on this machine: "
            + "; ".join(f"**{backend_label(n)}** ({backend_availability(n)[1]})" for n in missing),
            elem_id="compare-missing",
            elem_classes=["q8-note"],
        )
    gr.Markdown(isa_note(), elem_id="compare-isa", elem_classes=["q8-note"])
    verdict_md = gr.Markdown(elem_id="compare-verdict")
    answers, scheme_boxes = [], []
    with gr.Row():
        for name in names:
            with gr.Column(min_width=220):
                gr.Markdown(f"#### {backend_label(name)}")
                schemes = list(backend_schemes(name))
                scheme_boxes.append(
                    gr.Dropdown(
                        [(s, s) for s in schemes],
                        value=schemes[0] if schemes else None,
                        label="Scheme",
                        info=scheme_summary(schemes[0]) if schemes else None,
                        elem_id=f"compare-scheme-{name}",
                    )
                )
                answers.append(gr.Markdown(elem_id=f"compare-answer-{name}", min_height=100))
        if "gpu" not in names:
            with gr.Column(min_width=220, elem_id="compare-recorded"):
                gr.Markdown("#### GPU (recorded)")
                gr.Markdown(recorded.markdown(True), elem_id="compare-recorded-text")
    with gr.Row():
        bars = [
            gr.BarPlot(
                pd.DataFrame(
                    {"bar": pd.Series(dtype=str), "engine": pd.Series(dtype=str), key: pd.Series(dtype=float)}
                ),
                x="bar",
                y=key,
                color="engine",
                title=title,
                x_title=" ",
                y_title=title,
                y_lim=[0, None],
                x_label_angle=-35,
                colors_in_legend=[],  # the bars are labelled; a legend would repeat them
                height=300,
                min_width=280,
                elem_id=f"compare-bar-{key}",
            )
            for key, title in METRICS
        ]
    plot = gr.ScatterPlot(
        frame([])[["run", "engine", "tokens_per_s"]].astype({"run": str}),
        x="run",
        y="tokens_per_s",
        color="engine",
        title="tokens/s of every run this session",
        x_title="run",
        y_title="tokens/s",
        y_lim=[0, None],
        height=260,
        elem_id="compare-timeline",
    )
    rows, verdicts = gr.State([]), gr.State([])
    download = gr.DownloadButton("Export CSV", value=None, elem_id="compare-csv")
    schemes_state = gr.State({})

    def pick(*values):
        return dict(zip(names, values, strict=True))

    def describe(scheme):
        return gr.update(info=scheme_summary(scheme) if scheme else None)

    for box in scheme_boxes:
        box.change(pick, scheme_boxes, schemes_state, queue=False, api_visibility="private")
        box.change(describe, box, box, queue=False, api_visibility="private")
    run.click(
        compare,
        [prompt, chosen, model, system, max_new, schemes_state, rows, verdicts],
        [*answers, verdict_md, *bars, plot, rows, verdicts, download],
        concurrency_limit=capacity,
        concurrency_id="engine",
        api_visibility="private",
    )
    stop_btn.click(stop, None, None, queue=False, api_visibility="private")
