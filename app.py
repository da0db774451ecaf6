"""q8chat: the Gradio page (also the Hugging Face Space entry). No model logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading

import gradio as gr

from models.backend import SamplingParams
from models.registry import DEFAULT_MODEL
from service import BACKENDS, ChatService, ChatSettings, ChatUpdate, backend_availability, backend_schemes

log = logging.getLogger("q8chat")
service = ChatService()
cancel_events: dict[str, threading.Event] = {}

METRICS_RE = re.compile(r"\n*`TTFT [^\n]*`\Z")


def metrics_line(update: ChatUpdate) -> str:
    t = update.timings
    parts = [f"TTFT {t.ttft_ms:.0f} ms"]
    if t.generated_tokens > 1:
        parts += [f"{t.tpot_ms:.1f} ms/token", f"{t.tokens_per_s:.1f} tokens/s"]
    parts += [update.backend.upper(), update.scheme, f"{t.prompt_tokens} → {t.generated_tokens} tokens"]
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
        text = ""
        for update in service.chat(message, [], settings):
            text = update.text
        return text
    except Exception as e:  # noqa: BLE001
        raise gr.Error(friendly_error(e)) from None


def on_backend_change(backend: str):
    ok, reason = backend_availability(backend)
    if not ok:
        gr.Warning(f"{backend.upper()} is not available: {reason}")
        return gr.update(value="cpu"), gr.update(choices=list(backend_schemes("cpu")), value="bf16")
    schemes = list(backend_schemes(backend))
    return gr.update(), gr.update(choices=schemes, value=schemes[0])


def backend_choices() -> tuple[list[tuple[str, str]], str]:
    choices, notes = [], []
    for name in BACKENDS:
        ok, reason = backend_availability(name)
        choices.append((name.upper() if ok else f"{name.upper()} (unavailable)", name))
        if not ok:
            notes.append(f"{name.upper()} unavailable: {reason}")
    return choices, "; ".join(notes)


def build_ui() -> gr.Blocks:
    choices, notes = backend_choices()
    with gr.Blocks(title="q8chat") as demo:
        with gr.Sidebar(open=True):
            gr.Markdown("### q8chat\nQuantized LLM chat on CPU and GPU.")
            backend = gr.Radio(choices, value="cpu", label="Backend", info=notes or None, elem_id="backend")
            model = gr.Dropdown(
                [DEFAULT_MODEL],
                value=DEFAULT_MODEL,
                allow_custom_value=True,
                label="Model",
                info="the embedded default, a model folder or a .gguf file",
                elem_id="model",
            )
            scheme = gr.Dropdown(
                list(backend_schemes("cpu")), value="bf16", label="Quantization scheme", elem_id="scheme"
            )
            system = gr.Textbox(label="System prompt", lines=3, placeholder="You are a helpful assistant.")
            with gr.Accordion("Sampling", open=False):
                max_new = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
                rep = gr.Slider(1.0, 2.0, value=1.1, step=0.01, label="Repetition penalty")
                seed = gr.Number(value=None, precision=0, label="Seed (empty = random)")
        chatbot = gr.Chatbot(label="Chat", height=540, elem_id="chatbot")
        with gr.Row():
            box = gr.Textbox(placeholder="Ask something…", show_label=False, scale=8, elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        status = gr.Markdown(elem_id="status")

        inputs = [box, chatbot, backend, model, scheme, system, max_new, temperature, top_p, top_k, rep, seed]
        outputs = [chatbot, box, status]
        for trigger in (box.submit, send.click):
            trigger(respond, inputs, outputs, concurrency_limit=1, concurrency_id="engine", api_visibility="private")
        stop_btn.click(stop, None, None, queue=False, api_visibility="private")
        backend.change(on_backend_change, backend, [backend, scheme], api_visibility="private")
        gr.api(chat_api, api_name="chat", concurrency_limit=1, concurrency_id="engine")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="q8chat: chat with quantized LLMs in the browser")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the page to the network)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--no-preload", action="store_true", help="do not load the default model before serving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.no_preload:
        log.info("loading %s on CPU (first start converts the embedded model, ~30 s)", DEFAULT_MODEL)
        service.engine("cpu", DEFAULT_MODEL, "bf16")
    build_ui().queue().launch(server_name=args.host, server_port=args.port, theme=gr.themes.Soft())


if __name__ == "__main__":
    main()
