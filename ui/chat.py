"""The chat: the streaming handler, the message queue that keeps what people type while an answer streams, regenerate
and edit, conversations kept in the browser, and the sidebar's settings."""

from __future__ import annotations

import logging
import queue
import re
import threading
import time

import gradio as gr

from models.backend import TEMPERATURE_MAX, RequestError, SamplingParams
from models.registry import DEFAULT_MODEL
from quant.schemes import DEFAULT_SCHEME, get_scheme
from serving.service import (
    BACKENDS,
    CHAT_DEFAULTS,
    ChatSettings,
    ChatUpdate,
    backend_availability,
    backend_label,
    backend_schemes,
    build_progress,
    default_backend,
)
from ui import shared
from ui.text import EXAMPLES, METRICS_LEGEND, scheme_summary

log = logging.getLogger("q8chat")

METRICS_RE = re.compile(r"\n*`TTFT [^\n]*`\Z")
SEED_MAX = 2**63 - 1
WAIT_TICK_S = 0.5  # how often the page says how long the prompt has been read


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


def parse_seed(seed) -> int | None:
    """Empty means random. The box is text so that empty stays empty (a number box turns it into 0)."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return None
    if isinstance(seed, bool):
        raise RequestError(f"seed must be a whole number from 0 to {SEED_MAX}, or empty for random")
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, str) and re.fullmatch(r"\s*\d+\s*", seed):
        seed = int(seed)
    if not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise RequestError(f"seed must be a whole number from 0 to {SEED_MAX}, or empty for random (got {seed!r})")
    return seed


def sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> SamplingParams:
    def as_int(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    return SamplingParams(
        max_new_tokens=as_int(max_new_tokens),
        temperature=temperature,
        top_p=top_p,
        top_k=as_int(top_k),
        repetition_penalty=repetition_penalty,
        seed=parse_seed(seed),
    )


def friendly_error(e: Exception) -> str:
    if isinstance(e, ValueError):  # our validation errors all derive from ValueError and speak to the user
        return str(e)
    log.exception("chat failed")
    return f"Something went wrong inside q8chat ({type(e).__name__}); the server log has the details."


def loading_note(scheme: str) -> str:
    try:
        quantized = get_scheme(scheme).quantizes_weights
    except ValueError:
        return ""
    return (
        "its first use builds the quantized checkpoint (calibration + quantization), then it is cached"
        if (quantized)
        else ""
    )


def prompt_tokens_estimate(backend: str, model: str, scheme: str, texts: list[str]) -> int | None:
    """Roughly how many tokens the engine will read (for the waiting message); None when it cannot tell."""
    try:
        engine = shared.service.engine(backend, model, scheme)
        return sum(len(engine.tokenizer.encode(t)) for t in texts if t) + 4 * len(texts)
    except Exception:  # noqa: BLE001 - only a hint; the real count comes with the answer
        return None


def _pump(stream, out: queue.Queue) -> None:
    try:
        for update in stream:
            out.put(("update", update))
    except Exception as e:  # noqa: BLE001 - handed to the page's thread
        out.put(("error", e))
    out.put(("end", None))


def respond(
    message, history, backend, model, scheme, system, max_new, temperature, top_p, top_k, rep, seed, request=None,
    progress=None,
):
    """One answer: yields (chat, textbox, status). The user's message shows at once, then "reading N prompt tokens…"
    while the engine reads the prompt, then the answer as it streams, ending with its metrics line. On error the chat
    is unchanged and the message comes back for the text box."""
    history = list(history or [])
    cancel = shared.new_cancel(request)
    try:
        settings = ChatSettings(
            backend, model, scheme, system or "", sampling(max_new, temperature, top_p, top_k, rep, seed)
        )
        settings.sampling.validate()
        if not isinstance(message, str) or not message.strip():
            raise RequestError("the message is empty: type something first")
        shared.warmup.check(backend, scheme)
    except Exception as e:  # noqa: BLE001 - everything becomes a message, never a traceback
        yield history, message, f"**Cannot answer:** {friendly_error(e)}"
        return
    shown = history + [{"role": "user", "content": message.strip()}, {"role": "assistant", "content": ""}]
    started = time.monotonic()
    if not shared.service.is_loaded(backend, model, scheme):
        note = loading_note(scheme)
        waiting = f"Loading {model} ({backend_label(backend)}, {scheme}){': ' + note if note else ''}…"
    else:
        n = prompt_tokens_estimate(
            backend, model, scheme, [system or ""] + [m["content"] for m in strip_metrics(shown)]
        )
        waiting = f"reading {n:,} prompt tokens…" if n else "reading the prompt…"
    shown[-1] = {"role": "assistant", "content": f"*{waiting}*"}
    yield shown, "", f"{waiting[0].upper()}{waiting[1:]}"
    updates: queue.Queue = queue.Queue()
    stream = shared.service.chat(message, strip_metrics(history), settings, cancel)
    threading.Thread(target=_pump, args=(stream, updates), daemon=True, name="q8chat-answer").start()
    first = True
    try:
        while True:
            try:
                kind, update = updates.get(timeout=WAIT_TICK_S)
            except queue.Empty:
                if first:
                    elapsed = time.monotonic() - started
                    now = waiting
                    build = build_progress()
                    if build is not None:  # the load waits on the shared pipeline building the checkpoint
                        layer = f"layer {build.done + 1} of {build.total}"
                        now = f"building the {scheme} checkpoint: {build.stage}, {layer}…"
                        if progress is not None:
                            progress((build.done, build.total), desc=f"{build.stage} ({elapsed:.0f} s)", unit="layers")
                    shown[-1] = {"role": "assistant", "content": f"*{now} {elapsed:.0f} s*"}
                    yield shown, "", f"{now[0].upper()}{now[1:]} {elapsed:.0f} s"
                continue
            if kind == "end":
                return
            if kind == "error":
                if first:  # nothing was answered: the chat stays as it was, the message goes back to the box
                    yield history, message, f"**Cannot answer:** {friendly_error(update)}"
                else:
                    yield shown, "", f"**Cannot answer:** {friendly_error(update)}"
                return
            first = False
            answer = update.text if not update.done else f"{update.text}\n\n{metrics_line(update)}"
            shown[-1] = {"role": "assistant", "content": answer}
            yield shown, "", "" if update.done else "Generating…"
    finally:
        cancel.set()  # the page went away (or the answer ended): stop the engine's loop too


def chat_api(
    message: str,
    system_prompt: str = "",
    backend: str = "cpu",
    model: str = DEFAULT_MODEL,
    scheme: str = DEFAULT_SCHEME,
    max_new_tokens: int = CHAT_DEFAULTS.max_new_tokens,
    temperature: float = 0.0,
    top_p: float = CHAT_DEFAULTS.top_p,
    top_k: int = CHAT_DEFAULTS.top_k,
    repetition_penalty: float = CHAT_DEFAULTS.repetition_penalty,
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
        shared.warmup.check(backend, scheme)
        text = ""
        for update in shared.service.chat(message, [], settings):
            text = update.text
        return text
    except Exception as e:  # noqa: BLE001
        raise gr.Error(friendly_error(e)) from None


# --- the page: a queue in front of respond, so that nothing typed is lost while an answer streams ---


def _queued_status(pending) -> str:
    if not pending:
        return ""
    items = "; ".join(f"“{m[:60]}{'…' if len(m) > 60 else ''}”" for m in pending)
    return f"Queued ({len(pending)}), sent when this answer ends: {items}"


def _buttons(busy: bool) -> tuple[dict, dict]:
    send = gr.update(value="Queue" if busy else "Send", variant="secondary" if busy else "primary")
    stop = gr.update(interactive=busy)
    return send, stop


def take(message, history, request: gr.Request):
    """Send/Enter, without the queue: clears the box at once; shows the message in the chat at once when nothing is
    answering, or lists it as queued while an answer streams. Returns (box, chat, status)."""
    if not isinstance(message, str) or not message.strip():
        return gr.skip(), gr.skip(), "Type a message first."
    s = shared.session(request)
    with shared.lock():
        s.pending.append(message)
        busy = s.running
        pending = list(s.pending)
    if busy:
        return "", gr.skip(), _queued_status(pending)
    return "", list(history or []) + [{"role": "user", "content": message.strip()}], "Waiting for the engine…"


def run_chat(
    history, backend, model, scheme, system, max_new, temperature, top_p, top_k, rep, seed, request: gr.Request,
    progress=gr.Progress(),  # noqa: B008 - Gradio's way of asking for the event's progress bar
):
    """Answers this tab's queued messages one after another (one loop per tab; a second trigger while it runs
    returns at once and its message is answered by the running loop). Yields (chat, box, status, send, stop, saved):
    the conversation is saved in the browser after each answer, not on every streamed token."""
    s = shared.session(request)
    with shared.lock():
        if s.running or not s.pending:
            # the running loop answers it (a generator that yields nothing would blank every output)
            yield (gr.skip(),) * 6
            return
        s.running = True
    history = list(history or [])
    try:
        while True:
            with shared.lock():
                if not s.pending:
                    s.running = False
                    break
                message = s.pending.popleft()
            if history and history[-1].get("role") == "user" and message_text(history[-1]) == message.strip():
                history = history[:-1]  # shown by take() at once; respond() adds it back with its answer
            last = (history, "", "")
            restore = None
            args = (backend, model, scheme, system, max_new, temperature, top_p, top_k, rep, seed)
            for shown, box, status in respond(message, history, *args, request, progress):
                if box:  # refused: the message goes back to the box
                    restore = box
                with shared.lock():
                    queued = _queued_status(s.pending)
                last = (shown, box, status)
                yield (
                    shown,
                    gr.update(value=restore) if restore else gr.skip(),
                    (f"{status}\n\n{queued}" if queued and status else status or queued),
                    *_buttons(True),
                    gr.skip(),
                )
            history = last[0]
    finally:
        with shared.lock():
            s.running = False
    yield history, gr.skip(), gr.skip(), *_buttons(False), history


def stop(box, request: gr.Request):
    """Stop: ends the answer; queued messages come back into the box (appended to whatever is typed there)."""
    dropped = shared.stop(request)
    if not dropped:
        return gr.skip(), gr.skip()
    text = "\n".join([box] + dropped if box else dropped)
    return text, f"Stopped. {len(dropped)} queued message(s) put back in the box."


def retry(history, data: gr.RetryData, request: gr.Request):
    """Regenerate: the chat up to the user's message, which goes back into the queue."""
    history = list(history or [])
    message = message_text(history[data.index])
    with shared.lock():
        shared.session(request).pending.append(message)
    return history[: data.index + 1]


def edit(history, data: gr.EditData, request: gr.Request):
    """Edit a message of yours: the chat up to it, then the edited text is answered again."""
    history = list(history or [])
    text = data.value if isinstance(data.value, str) else message_text({"content": data.value})
    with shared.lock():
        shared.session(request).pending.append(text)
    return history[: data.index] + [{"role": "user", "content": text.strip()}]


def clear(request: gr.Request):
    shared.stop(request)
    return [], "", []


def restore(saved):
    """On page load: the conversation this browser kept."""
    return saved if isinstance(saved, list) and saved else gr.skip()


# --- sidebar ---


def backend_choices() -> tuple[list[tuple[str, str]], str]:
    """Radio choices (unavailable ones labelled and disabled on the page) and one compact line of reasons."""
    choices, notes = [], []
    for name in BACKENDS:
        ok, reason = backend_availability(name)
        choices.append((backend_label(name) if ok else f"{backend_label(name)} (unavailable)", name))
        if not ok:
            notes.append(f"{backend_label(name)} unavailable: {reason}")
    return choices, "; ".join(notes)


def unavailable() -> list[str]:
    return [name for name in BACKENDS if not backend_availability(name)[0]]


def on_backend_change(backend: str):
    ok, reason = backend_availability(backend)
    if not ok:  # the page disables these; this is the server's own guard
        gr.Warning(f"{backend_label(backend)} is not available: {reason}")
        fallback = default_backend()
        schemes = list(backend_schemes(fallback))
        return gr.update(value=fallback), gr.update(choices=schemes, value=schemes[0], info=scheme_summary(schemes[0]))
    schemes = list(backend_schemes(backend))
    return gr.update(), gr.update(choices=schemes, value=schemes[0], info=scheme_summary(schemes[0]))


def sidebar() -> dict:
    """The settings every chat uses; returns the components by name."""
    choices, notes = backend_choices()
    default = default_backend()
    schemes = list(backend_schemes(default))
    c = {}
    c["backend"] = gr.Radio(choices, value=default, label="Backend", elem_id="backend")
    if notes:
        gr.Markdown(notes, elem_id="backend-notes", elem_classes=["q8-note"])
    if "ipex" not in unavailable():
        gr.Markdown(
            "IPEX is legacy, opt-in: archived upstream with a security notice; OpenVINO is maintained.",
            elem_classes=["q8-note"],
        )
    c["model"] = gr.Dropdown(
        [DEFAULT_MODEL],
        value=DEFAULT_MODEL,
        allow_custom_value=True,
        label="Model",
        info="the embedded default, a model folder or a .gguf file",
        elem_id="model",
    )
    c["scheme"] = gr.Dropdown(
        schemes, value=schemes[0], label="Quantization scheme", info=scheme_summary(schemes[0]), elem_id="scheme"
    )
    c["system"] = gr.Textbox(
        label="System prompt", lines=3, placeholder="none (the model's own default)", elem_id="system"
    )
    with gr.Accordion("Sampling", open=False, elem_id="sampling"):
        c["max_new"] = gr.Slider(1, 2048, value=CHAT_DEFAULTS.max_new_tokens, step=1, label="Max new tokens")
        c["temperature"] = gr.Slider(
            0.0, TEMPERATURE_MAX, value=0.0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
        )
        c["top_p"] = gr.Slider(0.05, 1.0, value=CHAT_DEFAULTS.top_p, step=0.05, label="Top-p")
        c["top_k"] = gr.Slider(0, 200, value=CHAT_DEFAULTS.top_k, step=1, label="Top-k (0 = off)")
        c["rep"] = gr.Slider(1.0, 2.0, value=CHAT_DEFAULTS.repetition_penalty, step=0.01, label="Repetition penalty")
        c["seed"] = gr.Textbox(value="", label="Seed", placeholder="empty = random", elem_id="seed")
    return c


SETTINGS = ("backend", "model", "scheme", "system", "max_new", "temperature", "top_p", "top_k", "rep", "seed")


def build(settings: dict, capacity: int) -> dict:
    """The chat tab; wires its events. Returns its components by name."""
    c = {}
    c["chatbot"] = gr.Chatbot(
        label="Chat",
        height="62vh",
        min_height=320,
        elem_id="chatbot",
        buttons=["copy"],
        editable="user",
        placeholder="Ask something, or try an example below.",
    )
    with gr.Row(equal_height=True, elem_id="composer"):
        c["box"] = gr.Textbox(
            placeholder="Ask something… (Enter sends; while an answer streams, Enter queues)",
            show_label=False,
            scale=8,
            min_width=160,
            elem_id="message",
        )
        c["send"] = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="send")
        c["stop"] = gr.Button("Stop", variant="stop", scale=1, min_width=70, interactive=False, elem_id="stop")
    c["status"] = gr.Markdown(elem_id="status")
    gr.Examples(EXAMPLES, inputs=c["box"], label="Examples")
    gr.Markdown(METRICS_LEGEND, elem_classes=["q8-note"], elem_id="metrics-legend")
    # the conversation survives a reload: kept in this browser's localStorage (encrypted by Gradio)
    c["saved"] = gr.BrowserState([], storage_key="q8chat-conversation")

    chatbot, box, status = c["chatbot"], c["box"], c["status"]
    inputs = [chatbot] + [settings[k] for k in SETTINGS]
    outputs = [chatbot, box, status, c["send"], c["stop"], c["saved"]]
    for trigger in (box.submit, c["send"].click):
        trigger(take, [box, chatbot], [box, chatbot, status], queue=False, trigger_mode="multiple",
                api_visibility="private").then(
            run_chat, inputs, outputs, concurrency_limit=capacity, concurrency_id="engine", trigger_mode="multiple",
            show_progress="hidden", api_visibility="private",
        )  # fmt: skip
    for event, fn in ((chatbot.retry, retry), (chatbot.edit, edit)):
        event(fn, chatbot, chatbot, queue=False, api_visibility="private").then(
            run_chat, inputs, outputs, concurrency_limit=capacity, concurrency_id="engine", trigger_mode="multiple",
            show_progress="hidden", api_visibility="private",
        )  # fmt: skip
    c["stop"].click(stop, box, [box, status], queue=False, api_visibility="private")
    chatbot.clear(clear, None, [chatbot, status, c["saved"]], queue=False, api_visibility="private")
    settings["backend"].change(
        on_backend_change, settings["backend"], [settings["backend"], settings["scheme"]], api_visibility="private"
    )
    settings["scheme"].change(
        lambda s: gr.update(info=scheme_summary(s) if s else None), settings["scheme"], settings["scheme"],
        queue=False, api_visibility="private",
    )  # fmt: skip
    return c
