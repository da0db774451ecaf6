#!/usr/bin/env bash
# optimum-intel pulls a torchvision whose compiled ops do not match torch 2.13's CPU wheel
# ("operator torchvision::nms does not exist" on import); the text models never use it.
set -euo pipefail
"$1/bin/python" -m pip uninstall -y -q torchvision
