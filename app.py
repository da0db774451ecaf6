"""q8chat: the Gradio page (also the Hugging Face Space entry). The page only: its parts live in ui/, the server in
serving/, no model logic here."""

from __future__ import annotations

import gradio as gr

from serving.service import BACKENDS, backend_availability, backend_class
from ui import chat, compare, shared
from ui.chat import backend_choices, chat_api, respond, stop  # noqa: F401 - the page's handlers, as tests call them
from ui.text import API_NOTE, INTRO, schemes_legend

service, warmup = shared.service, shared.warmup

# Styles and page behaviour that Gradio has no argument for: disabled radio choices for unavailable backends, a
# copy button that leaves the metrics line out, and a sidebar that starts closed on a phone instead of covering the
# chat.
CSS = """
.q8-note, .q8-note p { font-size: var(--text-sm); color: var(--body-text-color-subdued); margin: 0; }
#compare-verdict p { font-size: var(--text-lg); }
#composer { align-items: stretch; }
@media (max-width: 768px) {
  #chatbot { height: 46vh !important; }
  #intro p { font-size: var(--text-sm); line-height: 1.35; }
  #composer { flex-wrap: nowrap !important; gap: 4px; }
  #composer button { min-width: 56px !important; padding: 0 6px; }
}
"""

JS = r"""
const METRICS = /\n*`TTFT [^\n]*`\s*$/;
if (navigator.clipboard && !navigator.clipboard.__q8chat) {
  const write = navigator.clipboard.writeText.bind(navigator.clipboard);
  navigator.clipboard.writeText = (text) => write(String(text).replace(METRICS, ""));
  navigator.clipboard.__q8chat = true;
}
const closeOnPhone = () => {
  if (window.innerWidth > 768) return true;
  const sidebar = document.querySelector(".sidebar.open");
  if (!sidebar) return !!document.querySelector(".sidebar");
  const toggle = sidebar.querySelector(".toggle-button");
  if (toggle) { toggle.click(); return true; }
  return false;
};
let tries = 0;
const timer = setInterval(() => { if (closeOnPhone() || ++tries > 50) clearInterval(timer); }, 100);
"""


def disabled_css() -> str:
    """Unavailable backends stay listed with their reason but cannot be clicked."""
    rules = [
        f'#backend label:has(input[value="{name}"]) {{ opacity: 0.45; pointer-events: none; cursor: not-allowed; }}'
        for name in BACKENDS
        if not backend_availability(name)[0]
    ]
    return "\n".join(rules)


def startup_status():
    text = shared.warmup.markdown()
    return gr.update(value=text, visible=bool(text)), gr.Timer(active=shared.warmup.status()["state"] == "loading")


def engine_capacity() -> int:
    """Chats the queue runs at once: every chat event shares the "engine" concurrency group, so the smallest
    capacity (Backend.CAPACITY) of the backends this machine offers."""
    return min(backend_class(name).CAPACITY for name in BACKENDS if backend_availability(name)[0])


def build_ui() -> gr.Blocks:
    capacity = engine_capacity()
    with gr.Blocks(title="q8chat") as demo:
        gr.HTML("", head=f"<style>{CSS}\n{disabled_css()}</style>", js_on_load=JS, padding=False, container=False,
                elem_id="q8-page-helpers")  # fmt: skip
        with gr.Sidebar(open=True, elem_id="sidebar"):
            gr.Markdown("### q8chat")
            settings = chat.sidebar()
            gr.Markdown("**Schemes** — " + schemes_legend(), elem_classes=["q8-note"], elem_id="schemes-legend")
            gr.Markdown(API_NOTE, elem_classes=["q8-note"], elem_id="api-note")
        gr.Markdown(INTRO, elem_id="intro")
        loading = gr.Markdown(shared.warmup.markdown(), visible=bool(shared.warmup.markdown()), elem_id="startup")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                parts = chat.build(settings, capacity)
            with gr.Tab("Compare", id="compare", elem_id="compare-tab"):
                compare.build(settings["model"], settings["system"], capacity)
        gr.api(chat_api, api_name="chat", concurrency_limit=capacity, concurrency_id="engine")

        timer = gr.Timer(1.0, active=shared.warmup.status()["state"] == "loading")
        timer.tick(startup_status, None, [loading, timer], queue=False, api_visibility="private")
        demo.load(startup_status, None, [loading, timer], queue=False, api_visibility="private")
        demo.load(chat.restore, parts["saved"], parts["chatbot"], queue=False, api_visibility="private")
    return demo


def main(argv: list[str] | None = None) -> None:
    from serving.server import serve

    serve(build_ui, shared.service, shared.warmup, argv)


if __name__ == "__main__":
    main()
