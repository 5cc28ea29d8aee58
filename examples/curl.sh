#!/usr/bin/env bash
# curl against the Qwen OAuth proxy, in both ways of using it.
#
#   examples/curl.sh reverse   # mitmdump -s addon/qwen_addon.py --mode reverse:https://portal.qwen.ai
#   examples/curl.sh stream    # the same, streamed (server-sent events)
#   examples/curl.sh models    # the same, GET /v1/models
#   examples/curl.sh regular   # mitmdump -s addon/qwen_addon.py   (a regular HTTPS proxy)
#   examples/curl.sh regular-stream
#
# No API key is needed: the proxy adds the Qwen OAuth token (it replaces any key you send).
# While nobody is logged in, the proxy answers 503 with a JSON body that carries the login link;
# open it, approve, and run the command again. `--retry 60` (as in `wait` below) makes curl
# ride out the login by itself: curl retries 503s and honours their Retry-After header.
#
# Settings, from the environment:
#   PROXY   the proxy's address               (default http://127.0.0.1:8080)
#   API     the Qwen API, in regular mode     (default https://portal.qwen.ai/v1)
#   CA      mitmproxy's CA, in regular mode   (default ~/.mitmproxy/mitmproxy-ca-cert.pem)
#   MODEL   the model                         (default coder-model)
#   PROMPT  what to say                       (default: a greeting)
set -euo pipefail

PROXY=${PROXY:-http://127.0.0.1:8080}
API=${API:-https://portal.qwen.ai/v1}
CA=${CA:-$HOME/.mitmproxy/mitmproxy-ca-cert.pem}
MODEL=${MODEL:-coder-model}
PROMPT=${PROMPT:-Say hello in one short sentence.}

# The request body; "$1" is "true" for a streamed answer. (The prompt must not contain quotes.)
body() {
    printf '{"model": "%s", "stream": %s, "messages": [{"role": "user", "content": "%s"}]}' \
        "$MODEL" "${1:-false}" "$PROMPT"
}

case "${1:-reverse}" in
reverse)
    # Reverse mode: the proxy *is* the API's base URL, plain HTTP on loopback, no CA needed.
    curl -sS "$PROXY/v1/chat/completions" \
        -H 'Content-Type: application/json' \
        -d "$(body)"
    ;;
stream)
    # -N: no output buffering, so each `data:` event shows as it arrives.
    curl -sS -N "$PROXY/v1/chat/completions" \
        -H 'Content-Type: application/json' \
        -d "$(body true)"
    ;;
models)
    curl -sS "$PROXY/v1/models"
    ;;
wait)
    # Like `reverse`, but rides out a pending login: curl retries the 503s, honouring their
    # Retry-After, and says so ("Will retry in 2 seconds"). --fail keeps the 503 bodies out of
    # the output; the login link is in the proxy's log (or run `reverse` once to see it).
    curl --no-progress-meter --fail --retry 60 --retry-max-time 600 "$PROXY/v1/chat/completions" \
        -H 'Content-Type: application/json' \
        -d "$(body)"
    ;;
regular)
    # Regular (forward) proxy mode: ask for the real API URL, through the proxy. curl must trust
    # mitmproxy's CA, which signs the certificate the proxy shows for portal.qwen.ai.
    curl -sS --proxy "$PROXY" --cacert "$CA" "$API/chat/completions" \
        -H 'Content-Type: application/json' \
        -d "$(body)"
    ;;
regular-stream)
    curl -sS -N --proxy "$PROXY" --cacert "$CA" "$API/chat/completions" \
        -H 'Content-Type: application/json' \
        -d "$(body true)"
    ;;
*)
    echo "usage: $0 [reverse|stream|models|wait|regular|regular-stream]" >&2
    exit 2
    ;;
esac
echo
