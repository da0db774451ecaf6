"""The HTTP server: the OpenAI-compatible API under /v1, /healthz, and a Gradio page mounted at /."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

import gradio as gr

from serving.service import ChatService
from serving.startup import Warmup, startup_steps

log = logging.getLogger("q8chat")


def create_app(
    build_page: Callable[[], gr.Blocks],
    service: ChatService,
    warmup: Warmup,
    preload: bool = True,
    build_schemes: str = "auto",
):
    from fastapi import FastAPI

    from serving.openai_api import create_router

    api = FastAPI(title="q8chat", docs_url=None, redoc_url=None, openapi_url=None)
    api.include_router(create_router(service, warmup))

    @api.get("/healthz")
    def healthz() -> dict:
        status = warmup.status()
        return {"status": "ok", "ready": status["state"] == "ready", "startup": status}

    if preload:
        warmup.start(startup_steps(service, build_schemes))
    demo = build_page().queue()
    return gr.mount_gradio_app(api, demo, path="/", theme=gr.themes.Soft(), ssr_mode=False, footer_links=["api"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="q8chat: chat with quantized LLMs in the browser")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the page to the network)",
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--no-preload", action="store_true", help="load models on the first request, not at start")
    parser.add_argument(
        "--model-dir",
        action="append",
        default=[],
        help="a folder (or .gguf file) the Model box may load from, besides the cache (repeatable; adds to "
        "$Q8CHAT_MODEL_DIRS); other paths are refused",
    )
    parser.add_argument(
        "--build-schemes",
        default=os.environ.get("Q8CHAT_BUILD_SCHEMES", "auto"),
        help="quantized checkpoints to build at start on a GPU machine: auto (all the GPU runs), none, or a list",
    )
    parser.add_argument(
        "--remote-url",
        default=os.environ.get("Q8CHAT_REMOTE_URL"),
        help="an OpenAI-compatible server to offer as the 'remote' backend, e.g. http://127.0.0.1:8000/v1",
    )
    parser.add_argument("--remote-model", default=os.environ.get("Q8CHAT_REMOTE_MODEL"), help="its model name")
    parser.add_argument(
        "--remote-api-key-env",
        default=os.environ.get("Q8CHAT_REMOTE_API_KEY_ENV", "Q8CHAT_REMOTE_API_KEY"),
        help="name of the environment variable holding its API key (the key never goes on the command line)",
    )
    args = parser.parse_args(argv)
    from remote_backend.engine import configure

    try:
        configure(args.remote_url, args.remote_model, args.remote_api_key_env)
    except ValueError as e:
        parser.error(str(e))
    return args


def serve(
    build_page: Callable[[], gr.Blocks], service: ChatService, warmup: Warmup, argv: list[str] | None = None
) -> None:
    args = parse_args(argv)
    from models.registry import allow_model_dir

    for folder in args.model_dir:
        allow_model_dir(folder)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    app = create_app(build_page, service, warmup, preload=not args.no_preload, build_schemes=args.build_schemes)
    log.info("q8chat on http://%s:%d/ (OpenAI-compatible API under /v1)", args.host, args.port)
    # an open page keeps a connection (the tab's heartbeat stream): without a bound, SIGTERM waits on it forever
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
