"""The page's parts: chat, Compare, recorded measurements, and the words that explain them.

``ui.shared`` holds the page's service and start-up state without importing Gradio (test fixtures use it)."""
