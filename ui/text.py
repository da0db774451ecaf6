"""What the page says about itself: intro, examples, what each scheme means, the metrics legend."""

from __future__ import annotations

from quant.schemes import SCHEMES

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

# One line per scheme. quant.schemes will carry this as Scheme.summary; until then this dict is the one place.
_SUMMARIES = {
    "bf16": "no quantization (bfloat16 weights and math)",
    "w8a16-int8": "8-bit integer weights, 16-bit activations (weight-only: fewer bytes per token)",
    "w8a8-int8": "8-bit integer weights and activations, SmoothQuant (INT8 matrix units: VNNI / AMX)",
    "w8a8-fp8": "8-bit float weights and activations (FP8 tensor cores, GPU only)",
}


def scheme_summary(name: str) -> str:
    from quant import schemes

    summary = getattr(schemes.get_scheme(name), "summary", None) if name in SCHEMES else None
    return summary or _SUMMARIES.get(name, "")


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
