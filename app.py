"""q8chat: the Gradio page (also the Hugging Face Space entry). No model logic lives here."""

from __future__ import annotations

import csv
import dataclasses
import logging
import re
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from models.backend import SamplingParams
from models.registry import DEFAULT_MODEL
from serving.service import (
    BACKENDS,
    ChatService,
    ChatSettings,
    ChatUpdate,
    backend_availability,
    backend_class,
    backend_label,
    backend_schemes,
    default_backend,
)
from serving.startup import Warmup

log = logging.getLogger("q8chat")
service = ChatService()
warmup = Warmup()
cancel_events: dict[str, threading.Event] = {}

METRICS_RE = re.compile(r"\n*`TTFT [^\n]*`\Z")


def metrics_line(update: ChatUpdate) -> str:
    t = update.timings
    parts = [f"TTFT {t.ttft_ms:.0f} ms"]
    if t.generated_tokens > 1:
        parts += [f"{t.tpot_ms:.1f} ms/token", f"{t.tokens_per_s:.1f} tokens/s"]
    cached = f" ({t.cached_tokens} cached)" if t.cached_tokens else ""
    parts += [backend_label(update.backend), update.scheme, f"{t.prompt_tokens}{cached} → {t.generated_tokens} tokens"]
    if update.finish_reason == "cancelled":
        parts.append("stopped")
    elif update.finish_reason == "length":
        parts.append("hit max new tokens")
    if update.dropped_turns:
        parts.append(f"{update.dropped_turns} oldest turn(s) left out to fit the context")
    return "`" + " · ".join(parts) + "`"


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def strip_metrics(history: list[dict]) -> list[dict]:
    """The chat shown to people carries a metrics line under each answer; the model must not see it."""
    return [{"role": m.get("role"), "content": METRICS_RE.sub("", message_text(m))} for m in history or []]


def sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> SamplingParams:
    def as_int(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    seed = None if seed in (None, "") else as_int(seed)
    return SamplingParams(
        max_new_tokens=as_int(max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        top_k=as_int(top_k),
        repetition_penalty=repetition_penalty,
        seed=seed,
    )


def friendly_error(e: Exception) -> str:
    if isinstance(e, ValueError):  # our validation errors all derive from ValueError and speak to the user
        return str(e)
    log.exception("chat failed")
    return f"Something went wrong inside q8chat ({type(e).__name__}); the server log has the details."


def respond(
    message, history, backend, model, scheme, system, max_new, temperature, top_p, top_k, rep, seed, request: gr.Request
):
    """UI handler: streams (chat, textbox, status). On error the typed message stays in the box."""
    history = list(history or [])
    session = request.session_hash if request else "local"
    cancel = cancel_events[session] = threading.Event()
    try:
        settings = ChatSettings(
            backend, model, scheme, system or "", sampling(max_new, temperature, top_p, top_k, rep, seed)
        )
        warmup.check(backend, scheme)
        if not service.is_loaded(backend, model, scheme):
            note = LOADING_NOTE.get(scheme, "")
            yield history, message, f"Loading {model} ({backend_label(backend)}, {scheme}): {note}"
        stream = service.chat(message, strip_metrics(history), settings, cancel)
        first = next(stream)
    except Exception as e:  # noqa: BLE001 - everything becomes a message, never a traceback
        yield history, message, f"**Cannot answer:** {friendly_error(e)}"
        return
    history = history + [{"role": "user", "content": message.strip()}, {"role": "assistant", "content": ""}]
    update = first
    try:
        for update in _chain(first, stream):
            answer = update.text if not update.done else f"{update.text}\n\n{metrics_line(update)}"
            history[-1] = {"role": "assistant", "content": answer}
            yield history, "", ""
    except Exception as e:  # noqa: BLE001
        yield history, "", f"**Cannot answer:** {friendly_error(e)}"
    finally:
        cancel_events.pop(session, None)


LOADING_NOTE = {
    "w8a8-int8": "the first use builds its checkpoint (calibration on Wikipedia text + SmoothQuant), then it is cached",
    "w8a16-int8": "the first use builds its checkpoint, then it is cached",
    "w8a8-fp8": "the first use builds its checkpoint, then it is cached",
}


def _chain(first, rest):
    yield first
    yield from rest


def stop(request: gr.Request):
    event = cancel_events.get(request.session_hash if request else "local")
    if event is not None:
        event.set()


def chat_api(
    message: str,
    system_prompt: str = "",
    backend: str = "cpu",
    model: str = DEFAULT_MODEL,
    scheme: str = "bf16",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> str:
    """One chat turn without history; returns the answer text."""
    try:
        settings = ChatSettings(
            backend,
            model,
            scheme,
            system_prompt or "",
            sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed),
        )
        warmup.check(backend, scheme)
        text = ""
        for update in service.chat(message, [], settings):
            text = update.text
        return text
    except Exception as e:  # noqa: BLE001
        raise gr.Error(friendly_error(e)) from None


def on_backend_change(backend: str):
    ok, reason = backend_availability(backend)
    if not ok:
        gr.Warning(f"{backend_label(backend)} is not available: {reason}")
        return gr.update(value="cpu"), gr.update(choices=list(backend_schemes("cpu")), value="bf16")
    schemes = list(backend_schemes(backend))
    return gr.update(), gr.update(choices=schemes, value=schemes[0])


def backend_choices() -> tuple[list[tuple[str, str]], str]:
    choices, notes = [], []
    for name in BACKENDS:
        ok, reason = backend_availability(name)
        choices.append((backend_label(name) if ok else f"{backend_label(name)} (unavailable)", name))
        if not ok:
            notes.append(f"{backend_label(name)} unavailable: {reason}")
        elif name in BACKEND_NOTES:
            notes.append(BACKEND_NOTES[name])
    return choices, "; ".join(notes)


BACKEND_NOTES = {
    "ipex": "IPEX is legacy and opt-in: 2.8 is its last release and its repository was archived in 2026 with a "
    "notice of known security issues; OpenVINO is the maintained Intel runtime",
}


COMPARE_COLUMNS = [
    "run", "time", "backend", "scheme", "model", "prompt", "prompt_tokens", "generated_tokens",
    "ttft_ms", "tpot_ms", "tokens_per_s", "finish",
]  # fmt: skip
METRICS = (("ttft_ms", "Time to first token (ms)"), ("tpot_ms", "ms per output token"), ("tokens_per_s", "tokens/s"))


NUMERIC = {"run": "int64", "prompt_tokens": "int64", "generated_tokens": "int64"} | {k: "float64" for k, _ in METRICS}


def compare_frame(rows: list[dict]) -> pd.DataFrame:
    """Numeric columns typed as numbers even when empty, so the plots draw bars and lines, not categories."""
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS).astype(NUMERIC)


def compare_csv(rows: list[dict], session: str) -> str:
    """This session's measurements as a CSV file for the download button."""
    folder = Path(tempfile.gettempdir()) / "q8chat-compare"
    folder.mkdir(exist_ok=True)
    path = folder / f"q8chat-measurements-{re.sub(r'[^A-Za-z0-9_-]', '', session)[:40] or 'local'}.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def compare_note(name: str) -> str:
    ok, reason = backend_availability(name)
    return "" if ok else f"**{backend_label(name)} unavailable:** {reason}"


def compare(prompt, chosen, model, system, max_new, schemes, rows, request: gr.Request):
    """Compare handler: one prompt on each chosen backend in turn (never two at once, so the timings are
    fair), answers streamed into their columns, then the bar charts, the session plot and the CSV.

    Yields (answers per backend..., bars per metric..., timeline, rows, csv)."""
    rows = list(rows or [])
    session = request.session_hash if request else "local"
    answers = {name: "" for name in BACKENDS}
    keep = [gr.skip()] * (len(METRICS) + 3)

    def out(final=False, latest=None):
        cols = [answers[name] for name in BACKENDS]
        if not final:
            return (*cols, *keep)
        frame = compare_frame(latest or [])
        bars = [frame[["backend", key]] for key, _ in METRICS]
        timeline = compare_frame(rows)
        return (*cols, *bars, timeline, rows, compare_csv(rows, session) if rows else None)

    chosen = [name for name in BACKENDS if name in (chosen or [])]
    if not chosen:
        answers = {name: "*pick at least one backend above*" for name in BACKENDS}
        yield out()
        return
    run = 1 + max((r["run"] for r in rows), default=0)
    latest = []
    cancel = cancel_events[session] = threading.Event()
    try:
        for name in BACKENDS:
            if not backend_availability(name)[0]:
                answers[name] = compare_note(name)
                continue
            if name not in chosen:
                answers[name] = "*not selected*"
                continue
            scheme = schemes.get(name) or backend_schemes(name)[0]
            try:
                # every backend prefills the whole prompt (no KV cache reuse): TTFTs that compare
                params = dataclasses.replace(sampling(max_new, 0.0, 1.0, 0, 1.0, 0), cache_prompt=False)
                warmup.check(name, scheme)
                update = None
                for update in service.chat(prompt, [], ChatSettings(name, model, scheme, system or "", params), cancel):
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
            row = {
                "run": run,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "backend": backend_label(name),
                "scheme": update.scheme,
                "model": model,
                "prompt": prompt.strip(),
                "prompt_tokens": t.prompt_tokens,
                "generated_tokens": t.generated_tokens,
                "ttft_ms": round(t.ttft_ms, 2),
                "tpot_ms": round(t.tpot_ms, 3),
                "tokens_per_s": round(t.tokens_per_s, 2),
                "finish": update.finish_reason,
            }
            rows.append(row)
            latest.append(row)
            yield out()
    finally:
        cancel_events.pop(session, None)
    yield out(final=True, latest=latest)


def startup_status():
    text = warmup.markdown()
    return gr.update(value=text, visible=bool(text)), gr.Timer(active=warmup.status()["state"] == "loading")


def engine_capacity() -> int:
    """Chats the queue runs at once: every chat event shares the "engine" concurrency group, so the smallest
    capacity (Backend.CAPACITY) of the backends this machine offers."""
    return min(backend_class(name).CAPACITY for name in BACKENDS if backend_availability(name)[0])


def build_ui() -> gr.Blocks:
    choices, notes = backend_choices()
    capacity = engine_capacity()
    default = default_backend()
    with gr.Blocks(title="q8chat") as demo:
        with gr.Sidebar(open=True):
            gr.Markdown("### q8chat\nQuantized LLM chat on CPU and GPU.")
            backend = gr.Radio(choices, value=default, label="Backend", info=notes or None, elem_id="backend")
            model = gr.Dropdown(
                [DEFAULT_MODEL],
                value=DEFAULT_MODEL,
                allow_custom_value=True,
                label="Model",
                info="the embedded default, a model folder or a .gguf file",
                elem_id="model",
            )
            scheme = gr.Dropdown(
                list(backend_schemes(default)), value="bf16", label="Quantization scheme", elem_id="scheme"
            )
            system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.")
            with gr.Accordion("Sampling", open=False):
                max_new = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
                rep = gr.Slider(1.0, 2.0, value=1.1, step=0.01, label="Repetition penalty")
                seed = gr.Number(value=None, precision=0, label="Seed (empty = random)")
        loading = gr.Markdown(warmup.markdown(), visible=bool(warmup.markdown()), elem_id="startup")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                chatbot = gr.Chatbot(label="Chat", height=540, elem_id="chatbot")
                with gr.Row():
                    box = gr.Textbox(placeholder="Ask something…", show_label=False, scale=8, elem_id="message")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                status = gr.Markdown(elem_id="status")
            with gr.Tab("Compare", id="compare", elem_id="compare-tab"):
                compare_parts = build_compare(model, system, capacity)

        inputs = [box, chatbot, backend, model, scheme, system, max_new, temperature, top_p, top_k, rep, seed]
        outputs = [chatbot, box, status]
        for trigger in (box.submit, send.click):
            trigger(
                respond, inputs, outputs, concurrency_limit=capacity, concurrency_id="engine", api_visibility="private"
            )
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")
        compare_parts["stop"].click(stop, None, None, queue=False, api_visibility="private")
        backend.change(on_backend_change, backend, [backend, scheme], api_visibility="private")
        gr.api(chat_api, api_name="chat", concurrency_limit=capacity, concurrency_id="engine")

        timer = gr.Timer(1.0, active=warmup.status()["state"] == "loading")
        timer.tick(startup_status, None, [loading, timer], queue=False, api_visibility="private")
        demo.load(startup_status, None, [loading, timer], queue=False, api_visibility="private")
    return demo


def build_compare(model: gr.Dropdown, system: gr.Textbox, capacity: int = 1) -> dict:
    gr.Markdown(
        "Send one prompt to every chosen backend in turn (greedy decoding, so the answers are comparable) and "
        "compare time to first token, ms per output token and tokens/s. Every run of this session is kept "
        "for the plot below and the CSV."
    )
    available = [name for name in BACKENDS if backend_availability(name)[0]]
    with gr.Row():
        prompt = gr.Textbox(
            value="Explain in two sentences why the sky is blue.", label="Prompt", scale=6, elem_id="compare-prompt"
        )
        with gr.Column(scale=2):
            chosen = gr.CheckboxGroup(
                [(backend_label(n) if n in available else f"{backend_label(n)} (unavailable)", n) for n in BACKENDS],
                value=available,
                label="Backends",
                elem_id="compare-backends",
            )
            max_new = gr.Slider(8, 512, value=64, step=8, label="Max new tokens", elem_id="compare-max-new")
    with gr.Row():
        run = gr.Button("Compare", variant="primary", elem_id="compare-run")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="compare-stop")
    answers, scheme_boxes = [], []
    with gr.Row(equal_height=True):
        for name in BACKENDS:
            with gr.Column(min_width=240):
                gr.Markdown(f"#### {backend_label(name)}")
                schemes = list(backend_schemes(name))
                scheme_boxes.append(
                    gr.Dropdown(
                        schemes,
                        value=schemes[0] if schemes else None,
                        label="Scheme",
                        interactive=bool(schemes),
                        elem_id=f"compare-scheme-{name}",
                    )
                )
                answers.append(gr.Markdown(compare_note(name), elem_id=f"compare-answer-{name}", min_height=120))
    with gr.Row():
        bars = [
            gr.BarPlot(
                compare_frame([])[["backend", key]],
                x="backend",
                y=key,
                color="backend",
                title=title,
                y_title=title,
                y_lim=[0, None],
                height=240,
                elem_id=f"compare-bar-{key}",
            )
            for key, title in METRICS
        ]
    timeline = gr.LinePlot(
        compare_frame([]),
        x="run",
        y="tokens_per_s",
        color="backend",
        title="tokens/s over this session's runs",
        y_lim=[0, None],
        height=260,
        elem_id="compare-timeline",
    )
    rows = gr.State([])
    download = gr.DownloadButton("Export CSV", value=None, elem_id="compare-csv")
    schemes_state = gr.State({})

    def pick(*values):
        return dict(zip(BACKENDS, values, strict=True))

    for box in scheme_boxes:
        box.change(pick, scheme_boxes, schemes_state, queue=False, api_visibility="private")
    run.click(
        compare,
        [prompt, chosen, model, system, max_new, schemes_state, rows],
        [*answers, *bars, timeline, rows, download],
        concurrency_limit=capacity,
        concurrency_id="engine",
        api_visibility="private",
    )
    return {"stop": stop_btn}


def main(argv: list[str] | None = None) -> None:
    from serving.server import serve

    serve(build_ui, service, warmup, argv)


if __name__ == "__main__":
    main()
