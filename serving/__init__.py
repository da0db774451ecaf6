"""Serving: the chat service (messages in, events out), start-up warm-up, the OpenAI-compatible API and the
HTTP server that mounts the page. Nothing here touches tensors or Gradio components."""
