"""What the page says about itself: intro, examples, what each scheme means, the metrics legend."""

from __future__ import annotations

from quant.schemes import REGISTRY, SCHEMES

INTRO = (
    "Chat with a small LLM run by quantized engines: our CPU engine (AVX-512 / AMX INT8 kernels), OpenVINO and "
    "IPEX on the CPU, Triton FP8 / INT8 kernels on a GPU, or any OpenAI-compatible server. Pick a backend and a "
    "scheme in the sidebar; every answer ends with its latency. **Compare** runs one prompt on several engines "
    "side by side."
)

EXAMPLES = [
    "What is the capital of France? Answer in one short sentence.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about a quiet server room.",
    "Give me three tips for a good night's sleep.",
]

def scheme_summary(name: str) -> str:
    scheme = REGISTRY.get(name)
    return scheme.summary if scheme else ""


def schemes_legend() -> str:
    return " · ".join(f"**{name}**: {scheme_summary(name)}" for name in SCHEMES)


METRICS_LEGEND = (
    "Under each answer: **TTFT** time to first token (reading the prompt) · **ms/token** time per generated "
    "token after the first · **tokens/s** its inverse · backend and scheme · prompt tokens (how many came from "
    "the prompt cache) → generated tokens."
)

API_NOTE = (
    "Also an API: OpenAI-compatible at `/v1/chat/completions` (`openai` client, `base_url=<this page>/v1`) and "
    "Gradio's `/chat` endpoint (see *Use via API* at the bottom of the page)."
)
