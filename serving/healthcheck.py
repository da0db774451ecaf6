"""Container health check: exit 0 when the q8chat server answers /healthz (Dockerfile HEALTHCHECK)."""

import json
import os
import sys
import urllib.request

port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=8) as response:  # noqa: S310
        status = json.loads(response.read())
except (OSError, ValueError) as e:
    print(f"unhealthy: {e}")
    sys.exit(1)
print(json.dumps(status["startup"]))
sys.exit(0 if status.get("status") == "ok" else 1)
