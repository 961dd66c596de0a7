#!/usr/bin/env bash
# The enclave-serve demo on a machine without a TEE or GPU: tiny model, development KBS, sample TEE.
# Usage: scripts/demo.sh [stop]        (idempotent: re-running restarts the services)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
ES="$VENV/bin/enclave-serve"
DEMO=.demo
PORT=${DEMO_PORT:-8000}
KBS_PORT=${DEMO_KBS_PORT:-8080}
KEY_ID="kbs:///enclave-serve/model-key/tiny"

stop() {
  for name in runtime kbs; do
    if [ -f "$DEMO/$name.pid" ]; then
      pid=$(cat "$DEMO/$name.pid")
      if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$DEMO/$name.pid"
    fi
  done
}

if [ "${1:-}" = "stop" ]; then stop; echo "demo stopped"; exit 0; fi

mkdir -p "$DEMO"
chmod 700 "$DEMO"
stop

# 1. The provider's side: build the tiny model and encrypt it (skipped when already done).
if [ ! -f "$DEMO/tiny/config.json" ]; then
  "$ES" demo-model "$DEMO/tiny" --force >/dev/null
fi
if [ ! -f "$DEMO/tiny-encrypted/manifest.json" ] || [ ! -f "$DEMO/model.key" ]; then
  rm -rf "$DEMO/tiny-encrypted" "$DEMO/model.key"
  "$ES" pack "$DEMO/tiny" "$DEMO/tiny-encrypted" --key-id "$KEY_ID" --generate-key "$DEMO/model.key"
fi
[ -f "$DEMO/admin.token" ] || (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$DEMO/admin.token")

# 2. The provider's development KBS, holding the model key (accepts sample evidence: INSECURE).
"$ES" kbs-dev --host 127.0.0.1 --port "$KBS_PORT" --admin-token-file "$DEMO/admin.token" \
  --allow-insecure-sample-evidence --resource "enclave-serve/model-key/tiny=$DEMO/model.key" \
  >"$DEMO/kbs.log" 2>&1 &
echo $! > "$DEMO/kbs.pid"

# 3. The enclave: sample TEE (INSECURE, development only), key from the KBS, vLLM on the CPU.
HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 "$ES" run "$DEMO/tiny-encrypted" \
  --host 127.0.0.1 --port "$PORT" --tee sample --gpus none --allow-insecure-sample-tee \
  --kbs-url "http://127.0.0.1:$KBS_PORT" \
  -- --enforce-eager --max-model-len 512 --max-num-seqs 4 --dtype bfloat16 --served-model-name tiny \
  >"$DEMO/runtime.log" 2>&1 &
echo $! > "$DEMO/runtime.pid"

echo "booting (logs: $DEMO/runtime.log, $DEMO/kbs.log) ..."
for _ in $(seq 300); do
  body=$(curl -sk "https://127.0.0.1:$PORT/readyz" || true)
  case "$body" in
    *'"ready":true'*) break ;;
    *'"status":"failed"'*) echo "boot FAILED: $body"; tail -20 "$DEMO/runtime.log"; exit 1 ;;
  esac
  if ! kill -0 "$(cat "$DEMO/runtime.pid")" 2>/dev/null; then echo "runtime exited"; tail -30 "$DEMO/runtime.log"; exit 1; fi
  sleep 1
done
case "$body" in *'"ready":true'*) ;; *) echo "timed out waiting for readiness: $body"; exit 1 ;; esac

DIGEST=$("$VENV/bin/python" -c "import json,hashlib;print('sha256:'+hashlib.sha256(open('$DEMO/tiny-encrypted/manifest.json','rb').read()).hexdigest())")
cat <<MSG

enclave-serve demo is up (INSECURE sample TEE: development only).

  OpenAI base URL   https://127.0.0.1:$PORT/v1        (model name: tiny)
  readiness         curl -k https://127.0.0.1:$PORT/readyz
  boot stages       curl -k https://127.0.0.1:$PORT/.well-known/enclave-serve/boot

Verify the server (fresh nonce, TLS key binding, model identity):
  $ES verify https://127.0.0.1:$PORT --allow-insecure-sample-tee --expect-model $DIGEST

Use it from the OpenAI SDK, through a client that verifies first and pins the attested TLS key:
  $VENV/bin/python - <<'PY'
from attest.client import attested_openai
client = attested_openai("https://127.0.0.1:$PORT", allow_insecure=True,
                         expected_model_digest="$DIGEST")
reply = client.chat.completions.create(model="tiny", max_tokens=16,
                                       messages=[{"role": "user", "content": "Hello!"}])
print(reply.choices[0].message.content)
PY

Stop it with: make demo-stop
MSG
