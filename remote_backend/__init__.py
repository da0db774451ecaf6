"""Remote backend: any OpenAI-compatible server (vLLM, llama.cpp's server, another q8chat), streamed."""
