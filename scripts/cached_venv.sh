#!/usr/bin/env bash
# Build (once) the venv for requirements-NAME.txt in the q8chat cache, keyed by the file's hash,
# and point .venv-NAME at it. A build that did not finish is thrown away and redone.
set -euo pipefail
name="$1"
req="requirements-${name}.txt"
cache="${Q8CHAT_CACHE:-$HOME/.cache/q8chat}"
key=$( (cat "$req" scripts/after-venv-"$name".sh 2>/dev/null; python3 --version) | sha256sum | cut -c1-16)
dir="$cache/venvs/${name}-${key}"
if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    mkdir -p "$cache/venvs"
    python3 -m venv "$dir"
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q -r "$req"
    if [ -x scripts/after-venv-"$name".sh ]; then scripts/after-venv-"$name".sh "$dir"; fi
    touch "$dir/.complete"
fi
ln -sfn "$dir" ".venv-${name}"
echo ".venv-${name} -> $dir"
