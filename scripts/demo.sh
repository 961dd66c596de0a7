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

VLLM_ARGS=(--enforce-eager --max-model-len 512 --max-num-seqs 4 --dtype bfloat16 --served-model-name tiny)
DIGEST=$("$VENV/bin/python" -c "import hashlib;print('sha256:'+hashlib.sha256(open('$DEMO/tiny-encrypted/manifest.json','rb').read()).hexdigest())")
KBS_URL="http://127.0.0.1:$KBS_PORT"

# 2. The provider declares the workload (docs/configuration.md): one init-data holding the model,
#    its key, every attested setting, the vLLM options and the environment; `initdata` prints its
#    digest and the configuration digest the enclave will claim. The policy the KBS enforces and
#    the provider publishes pins both (the sample TEE: insecure_development).
PRIVATE=(--private-dir /dev/shm --allow-insecure-shared-private-dir)  # no memory emptyDir on a dev box
"$ES" image-facts > "$DEMO/image-facts.json"   # in production: recorded by the image build
DECLARED=$("$ES" initdata "$DEMO/tiny-encrypted" --expect-model "$DIGEST" --key-id "$KEY_ID" \
  --kbs-url "$KBS_URL" --allow-insecure-agent-policy --image-facts "$DEMO/image-facts.json" \
  --tee sample --gpus none --allow-insecure-sample-tee "${PRIVATE[@]}" \
  -o "$DEMO/initdata.toml" --json -- "${VLLM_ARGS[@]}")
INIT=$(printf '%s' "$DECLARED" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["init_data_digest"])')
CONFIG=$(printf '%s' "$DECLARED" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["config_sha256"])')
cat > "$DEMO/policy.toml" <<POLICY
version = 1
insecure_development = true  # DEVELOPMENT ONLY: the sample TEE proves nothing
[tee]
allowed = ["sample"]
[workload]
model = ["$DIGEST"]
config = ["$CONFIG"]
init_data = ["$INIT"]
POLICY

# 3. The provider's development KBS, holding the model key, releasing it only under the policy
#    (accepts sample evidence: INSECURE).
"$ES" kbs-dev --host 127.0.0.1 --port "$KBS_PORT" --admin-token-file "$DEMO/admin.token" \
  --allow-insecure-sample-evidence --resource "enclave-serve/model-key/tiny=$DEMO/model.key" \
  --resource-policy "enclave-serve/model-key/tiny=$DEMO/policy.toml" \
  >"$DEMO/kbs.log" 2>&1 &
echo $! > "$DEMO/kbs.pid"

# 4. The enclave, configured by the init-data alone: the sample TEE (INSECURE, development only)
#    plays the hardware register (--sample-init-data), --init-data is the file the pod gets; key
#    from the KBS, vLLM on the CPU. Only operational options (listen address) on the command line.
"$ES" run --init-data "$DEMO/initdata.toml" --sample-init-data "$DEMO/initdata.toml" \
  --host 127.0.0.1 --port "$PORT" \
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

cat <<MSG

enclave-serve demo is up (INSECURE sample TEE: development only).

  OpenAI base URL   https://127.0.0.1:$PORT/v1        (model name: tiny)
  readiness         curl -k https://127.0.0.1:$PORT/readyz
  boot stages       curl -k https://127.0.0.1:$PORT/.well-known/enclave-serve/boot

Verify the server against the provider's policy (fresh nonce, TLS key binding, init-data,
model, configuration), step by step:
  $ES verify https://127.0.0.1:$PORT --policy $DEMO/policy.toml --allow-insecure-sample-tee

Use it from the OpenAI SDK, through a client that verifies first and pins the attested TLS key:
  $VENV/bin/python - <<'PY'
from attest.client import attested_openai
client = attested_openai("https://127.0.0.1:$PORT", policy="$DEMO/policy.toml", allow_insecure=True)
reply = client.chat.completions.create(model="tiny", max_tokens=16,
                                       messages=[{"role": "user", "content": "Hello!"}])
print(reply.choices[0].message.content)
PY

Stop it with: make demo-stop
MSG
