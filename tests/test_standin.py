"""The Qwen stand-in behaves like a strict Qwen: OAuth device flow, refresh, API, faults, TLS."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from qwenproxy.profile import QWEN
from qwenproxy.standin import Fault, StandIn

REPLY = "Hello from the Qwen stand-in. You said: ping"
UNAUTHORIZED = {
    "error": {
        "message": "Invalid access token or token expired",
        "type": "invalid_request_error",
        "code": "invalid_api_key",
    }
}


# --- helpers -------------------------------------------------------------------------------------


def pkce() -> tuple[str, str]:
    """A fresh (verifier, S256 challenge) pair."""
    verifier = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def client(s: StandIn, **kwargs) -> httpx.Client:
    # trust_env=False: a proxy set in the environment must not see (or break) local traffic.
    return httpx.Client(base_url=s.base_url, verify=s.client_ssl_context() or True, trust_env=False, **kwargs)


def get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, trust_env=False, **kwargs)


def device_form(challenge: str, **overrides: str | None) -> dict[str, str]:
    form = {
        "client_id": QWEN.client_id,
        "scope": QWEN.scope,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    form.update(overrides)
    return {k: v for k, v in form.items() if v is not None}


def start_flow(c: httpx.Client, challenge: str) -> dict:
    r = c.post(QWEN.device_code_path, data=device_form(challenge))
    assert r.status_code == 200, r.text
    return r.json()


def poll(c: httpx.Client, device_code: str, verifier: str) -> httpx.Response:
    return c.post(
        QWEN.token_path,
        data={
            "grant_type": QWEN.device_grant_type,
            "client_id": QWEN.client_id,
            "device_code": device_code,
            "code_verifier": verifier,
        },
    )


def refresh(c: httpx.Client, refresh_token: str, client_id: str = QWEN.client_id):
    return c.post(
        QWEN.token_path,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": client_id,
        },
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def chat_body(stream: bool = False) -> dict:
    return {
        "model": "coder-model",
        "messages": [{"role": "user", "content": "ping"}],
        "stream": stream,
    }


def sse_events(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line]


def contents(events: list[str]) -> list[str]:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return [c["choices"][0]["delta"]["content"] for c in chunks if "content" in c["choices"][0]["delta"]]


def error_of(r: httpx.Response) -> str:
    return r.json()["error"]


@pytest.fixture
def clocked(make_standin, fake_clock) -> StandIn:
    return make_standin(clock=fake_clock)


@pytest.fixture
def http(standin: StandIn) -> Iterator[httpx.Client]:
    with client(standin) as c:
        yield c


@pytest.fixture
def token(standin: StandIn) -> str:
    return standin.mint_tokens()["access_token"]


# --- device flow ---------------------------------------------------------------------------------


def test_device_flow_with_pkce_issues_tokens_once(clocked, fake_clock):
    verifier, challenge = pkce()
    with client(clocked) as c:
        flow = start_flow(c, challenge)
        code = flow["user_code"]
        assert re.fullmatch(r"[A-Z]{4}-\d{4}", code)
        assert flow["verification_uri"] == f"{clocked.base_url}/authorize"
        assert flow["verification_uri_complete"] == (
            f"{clocked.base_url}/authorize?user_code={code}&client=qwen-code"
        )
        assert flow["expires_in"] == 600
        assert "interval" not in flow
        assert clocked.pending_user_codes() == [code]

        pending = poll(c, flow["device_code"], verifier)
        assert (pending.status_code, error_of(pending)) == (400, "authorization_pending")

        assert clocked.approve() == code
        fake_clock.advance(2)
        done = poll(c, flow["device_code"], verifier)
        assert done.status_code == 200, done.text
        tokens = done.json()
        assert tokens["token_type"] == "Bearer"
        assert tokens["expires_in"] == 6 * 3600
        assert tokens["resource_url"] == f"localhost:{clocked.port}"
        assert tokens["scope"] == QWEN.scope
        assert tokens["refresh_token"]
        assert c.get("/v1/models", headers=bearer(tokens["access_token"])).status_code == 200

        fake_clock.advance(2)
        again = poll(c, flow["device_code"], verifier)
        assert (again.status_code, error_of(again)) == (400, "invalid_grant")
    assert clocked.counts["device_code"] == 1
    assert clocked.counts["token_poll"] == 3


def test_poll_with_wrong_verifier_is_rejected(clocked):
    _, challenge = pkce()
    other_verifier, _ = pkce()
    with client(clocked) as c:
        flow = start_flow(c, challenge)
        clocked.approve(flow["user_code"])
        r = poll(c, flow["device_code"], other_verifier)
    assert (r.status_code, error_of(r)) == (400, "invalid_grant")
    assert "code_verifier" in r.json()["error_description"]


def test_poll_with_unknown_device_code_is_invalid_grant(http):
    verifier, _ = pkce()
    r = poll(http, "no-such-code", verifier)
    assert (r.status_code, error_of(r)) == (400, "invalid_grant")


@pytest.mark.parametrize(
    "interval, gap, expected",
    [
        (None, 1.0, "slow_down"),  # without interval, Qwen Code's 2 s applies
        (None, 1.9, "authorization_pending"),  # within the 10% slack
        (5, 4.0, "slow_down"),
        (5, 4.6, "authorization_pending"),
    ],
)
def test_polling_faster_than_the_interval_gets_slow_down(make_standin, fake_clock, interval, gap, expected):
    s = make_standin(clock=fake_clock, interval=interval)
    verifier, challenge = pkce()
    with client(s) as c:
        flow = start_flow(c, challenge)
        assert flow.get("interval") == interval
        poll(c, flow["device_code"], verifier)
        fake_clock.advance(gap)
        r = poll(c, flow["device_code"], verifier)
    assert error_of(r) == expected
    assert r.status_code == (429 if expected == "slow_down" else 400)


def test_denied_authorization_gets_access_denied(clocked):
    verifier, challenge = pkce()
    with client(clocked) as c:
        flow = start_flow(c, challenge)
        assert clocked.deny() == flow["user_code"]
        r = poll(c, flow["device_code"], verifier)
    assert (r.status_code, error_of(r)) == (400, "access_denied")
    assert clocked.pending_user_codes() == []


def test_expired_device_code_gets_expired_token(make_standin, fake_clock):
    s = make_standin(clock=fake_clock, device_code_lifetime=60)
    verifier, challenge = pkce()
    with client(s) as c:
        flow = start_flow(c, challenge)
        assert flow["expires_in"] == 60
        fake_clock.advance(60)
        assert s.pending_user_codes() == []
        with pytest.raises(LookupError):
            s.approve(flow["user_code"])
        r = poll(c, flow["device_code"], verifier)
    assert (r.status_code, error_of(r)) == (400, "expired_token")


def test_approve_without_pending_code_raises(standin):
    with pytest.raises(LookupError):
        standin.approve()


@pytest.mark.parametrize("path", [QWEN.device_code_path, QWEN.token_path])
def test_wrong_client_id_is_invalid_client(http, path):
    _, challenge = pkce()
    form = device_form(challenge, client_id="someone-else")
    form["grant_type"] = "refresh_token"
    r = http.post(path, data=form)
    assert (r.status_code, error_of(r)) == (401, "invalid_client")
    assert "error_description" in r.json()


@pytest.mark.parametrize("path", [QWEN.device_code_path, QWEN.token_path])
def test_json_body_is_invalid_request(http, path):
    _, challenge = pkce()
    r = http.post(path, json=device_form(challenge))
    assert (r.status_code, error_of(r)) == (400, "invalid_request")


@pytest.mark.parametrize(
    "overrides",
    [
        {"code_challenge": None},
        {"code_challenge_method": None},
        {"code_challenge_method": "plain"},
        {"scope": None},
    ],
)
def test_device_code_request_requires_pkce_s256_and_scope(http, overrides):
    _, challenge = pkce()
    r = http.post(QWEN.device_code_path, data=device_form(challenge, **overrides))
    assert (r.status_code, error_of(r)) == (400, "invalid_request")


def test_unknown_grant_type_is_unsupported(http):
    r = http.post(QWEN.token_path, data={"grant_type": "password", "client_id": QWEN.client_id})
    assert (r.status_code, error_of(r)) == (400, "unsupported_grant_type")


def test_wait_for_device_code_sees_requests_made_before_and_after_the_call(standin, http):
    _, challenge = pkce()
    early = start_flow(http, challenge)["user_code"]
    assert standin.wait_for_device_code(timeout=5) == early

    later: list[str] = []

    def request_in_background() -> None:
        with client(standin) as c:
            later.append(start_flow(c, challenge)["user_code"])

    worker = threading.Thread(target=request_in_background)
    worker.start()
    code = standin.wait_for_device_code(timeout=5)
    worker.join()
    assert [code] == later
    with pytest.raises(TimeoutError):
        standin.wait_for_device_code(timeout=0.01)


# --- the verification page -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "action, heading, status, outcome",
    [("approve", "Approved", 200, None), ("deny", "Denied", 400, "access_denied")],
)
def test_verification_page_buttons_decide_through_a_form_post(
    standin, http, action, heading, status, outcome
):
    verifier, challenge = pkce()
    flow = start_flow(http, challenge)
    page = http.get(flow["verification_uri_complete"])
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert flow["user_code"] in page.text

    form_action = re.search(r"<form method='post' action='([^']+)'", page.text).group(1)
    fields = dict(re.findall(r"<input type='hidden' name='([^']+)' value='([^']+)'", page.text))
    buttons = re.findall(r"<button [^>]*name='action' value='([^']+)'", page.text)
    assert buttons == ["approve", "deny"]
    decided = http.post(form_action, data={**fields, "action": action})
    assert decided.status_code == 200
    assert heading in decided.text

    r = poll(http, flow["device_code"], verifier)
    assert r.status_code == status
    if outcome:
        assert error_of(r) == outcome


def test_verification_page_for_unknown_code_is_not_found(http):
    assert http.get("/authorize", params={"user_code": "ZZZZ-0000"}).status_code == 404


# --- refresh -------------------------------------------------------------------------------------


def test_refresh_issues_new_access_token_and_old_one_stays_valid(standin, http):
    old = standin.mint_tokens()
    r = refresh(http, old["refresh_token"])
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] == old["refresh_token"]
    assert new["expires_in"] == 6 * 3600
    for access_token in (old["access_token"], new["access_token"]):
        assert http.get("/v1/models", headers=bearer(access_token)).status_code == 200
    assert standin.counts["token_refresh"] == 1


def test_refresh_with_revoked_or_unknown_token_is_invalid_grant(standin, http):
    tokens = standin.mint_tokens()
    assert standin.revoke_refresh_tokens() == 1
    for refresh_token in (tokens["refresh_token"], "never-issued"):
        r = refresh(http, refresh_token)
        assert (r.status_code, error_of(r)) == (400, "invalid_grant")


def test_rotating_refresh_retires_the_old_refresh_token(make_standin):
    s = make_standin(rotate_refresh=True)
    first = s.mint_tokens()
    with client(s) as c:
        second = refresh(c, first["refresh_token"]).json()
        assert second["refresh_token"] != first["refresh_token"]
        assert error_of(refresh(c, first["refresh_token"])) == "invalid_grant"
        assert refresh(c, second["refresh_token"]).status_code == 200


def test_refresh_with_wrong_client_is_invalid_client(standin, http):
    r = refresh(http, standin.mint_tokens()["refresh_token"], client_id="nope")
    assert (r.status_code, error_of(r)) == (401, "invalid_client")


# --- the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer"])
def test_chat_without_a_valid_bearer_token_is_401(standin, http, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    r = http.post("/v1/chat/completions", json=chat_body(), headers=headers)
    assert r.status_code == 401
    assert r.json() == UNAUTHORIZED
    assert standin.counts["unauthorized"] == 1


@pytest.mark.parametrize("spoil", ["revoke_access_tokens", "expire_access_tokens"])
def test_revoked_or_expired_access_token_is_401(standin, http, token, spoil):
    getattr(standin, spoil)()
    assert http.get("/v1/models", headers=bearer(token)).status_code == 401
    fresh = standin.mint_tokens()["access_token"]
    assert http.get("/v1/models", headers=bearer(fresh)).status_code == 200


def test_access_token_expires_with_the_clock(clocked, fake_clock):
    access_token = clocked.mint_tokens(lifetime=100)["access_token"]
    with client(clocked) as c:
        assert c.get("/v1/models", headers=bearer(access_token)).status_code == 200
        fake_clock.advance(100)
        assert c.get("/v1/models", headers=bearer(access_token)).status_code == 401


@pytest.mark.parametrize("prefix", ["/v1", "/compatible-mode/v1"])
def test_chat_answers_a_completion_echoing_the_last_user_message(http, token, prefix):
    r = http.post(f"{prefix}/chat/completions", json=chat_body(), headers=bearer(token))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "coder-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
        json.dumps({"model": "coder-model", "messages": []}).encode(),
        json.dumps({"model": "coder-model", "messages": [{"content": "no role"}]}).encode(),
    ],
)
def test_chat_rejects_malformed_requests(http, token, body):
    r = http.post("/v1/chat/completions", content=body, headers=bearer(token))
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_chat_stream_sends_chunks_then_done(standin, http, token):
    standin.stream_chunks = 3
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True), headers=bearer(token)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    pieces = contents(events)
    assert len(pieces) == 3
    assert "".join(pieces) == REPLY
    finish = json.loads(events[-2])
    assert finish["object"] == "chat.completion.chunk"
    assert finish["choices"][0]["finish_reason"] == "stop"


def test_stream_gate_delivers_the_first_chunk_before_the_rest_is_sent(standin, http, token):
    standin.hold_streams()
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True), headers=bearer(token)) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        # The first chunk arrived while the server holds the rest back.
        standin.wait_first_chunk_sent(timeout=5)
        standin.release_streams()
        rest = sse_events(lines)
    (first_piece,) = contents([first.removeprefix("data: ")])
    assert REPLY.startswith(first_piece) and first_piece != REPLY
    assert rest[-1] == "[DONE]"
    assert first_piece + "".join(contents(rest)) == REPLY


def test_stop_cuts_off_held_streams(standin, http, token):
    standin.hold_streams()
    body = chat_body(stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body, headers=bearer(token)) as r:
        lines = r.iter_lines()
        next(line for line in lines if line)
        standin.wait_first_chunk_sent(timeout=5)
        standin.stop()
        with pytest.raises(httpx.TransportError):
            list(lines)


async def test_stream_gate_works_from_async_tests(standin, token):
    standin.hold_streams()
    async with httpx.AsyncClient(
        trust_env=False, base_url=standin.base_url, verify=standin.client_ssl_context()
    ) as c:
        async with c.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=bearer(token)
        ) as r:
            lines = r.aiter_lines()
            first = await anext(line async for line in lines if line)
            await standin.wait_first_chunk_sent_async(timeout=5)
            standin.release_streams()
            rest = [line async for line in lines if line]
    assert first.startswith("data: ")
    assert rest[-1] == "data: [DONE]"


def test_openai_client_works_against_the_stand_in(standin, token):
    with httpx.Client(verify=standin.client_ssl_context(), trust_env=False) as transport:
        ai = openai.OpenAI(base_url=standin.api_base_url, api_key=token, http_client=transport)
        answer = ai.chat.completions.create(
            model="coder-model", messages=[{"role": "user", "content": "ping"}]
        )
        assert answer.choices[0].message.content == REPLY
        stream = ai.chat.completions.create(
            model="coder-model",
            messages=[{"role": "user", "content": "ping"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
        assert chunks[-1].usage is not None
        assert [m.id for m in ai.models.list()][:2] == ["coder-model", "qwen3-coder-plus"]


@pytest.mark.parametrize("prefix", ["/v1", "/compatible-mode/v1"])
def test_models_lists_models_to_authorized_clients(http, token, prefix):
    assert http.get(f"{prefix}/models").status_code == 401
    r = http.get(f"{prefix}/models", headers=bearer(token))
    assert r.status_code == 200
    assert r.json()["object"] == "list"
    assert {"coder-model", "qwen3-coder-plus"} <= {m["id"] for m in r.json()["data"]}


def test_api_requests_are_recorded_with_their_headers(standin, http, token):
    headers = {**bearer(token), "X-DashScope-AuthType": "qwen-oauth", "User-Agent": "QwenCode/x"}
    http.post("/compatible-mode/v1/chat/completions", json=chat_body(), headers=headers)
    (request,) = standin.requests
    assert (request.endpoint, request.method, request.path) == (
        "chat",
        "POST",
        "/compatible-mode/v1/chat/completions",
    )
    assert request.headers["x-dashscope-authtype"] == "qwen-oauth"
    assert request.headers["X-DashScope-AuthType"] == "qwen-oauth"
    assert request.headers["Authorization"] == f"Bearer {token}"
    assert json.loads(request.body) == chat_body()
    standin.reset_counts()
    assert standin.requests == [] and standin.counts["chat"] == 0


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/nope"), ("GET", "/models"), ("POST", "/chat/completions"), ("DELETE", "/v1/models")],
)
def test_unknown_paths_and_methods_get_json_errors(http, method, path):
    r = http.request(method, path)
    assert r.status_code in (404, 405)
    assert "message" in r.json()["error"]


# --- faults --------------------------------------------------------------------------------------


def test_status_fault_is_served_the_given_number_of_times(standin, http, token):
    fault = Fault(503, {"error": {"message": "overloaded"}}, headers={"Retry-After": "1"})
    standin.add_fault("chat", fault, times=2)
    for _ in range(2):
        r = http.post("/v1/chat/completions", json=chat_body(), headers=bearer(token))
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "1"
        assert r.json() == {"error": {"message": "overloaded"}}
    assert http.post("/v1/chat/completions", json=chat_body(), headers=bearer(token)).status_code == 200
    assert standin.counts["faults"] == 2
    assert standin.counts["chat"] == 3


def test_text_fault_on_the_token_endpoint(standin, http):
    standin.add_fault("token", Fault(502, "bad gateway"))
    tokens = standin.mint_tokens()
    r = refresh(http, tokens["refresh_token"])
    assert (r.status_code, r.text) == (502, "bad gateway")
    assert refresh(http, tokens["refresh_token"]).status_code == 200


def test_reset_fault_closes_the_connection_without_an_answer(standin, http):
    _, challenge = pkce()
    standin.add_fault("device_code", Fault(reset=True))
    with pytest.raises(httpx.TransportError):
        http.post(QWEN.device_code_path, data=device_form(challenge))
    start_flow(http, challenge)


def test_delay_fault_without_status_answers_normally_but_late(standin, http, token):
    standin.add_fault("models", Fault(status=None, delay=0.2))
    started = time.monotonic()
    r = http.get("/v1/models", headers=bearer(token))
    assert r.status_code == 200
    assert time.monotonic() - started >= 0.2


def test_delay_fault_outlasts_a_client_timeout(standin, token):
    standin.add_fault("chat", Fault(500, delay=30))
    # Only the read times out: a slow TLS handshake on a busy machine must not count.
    with client(standin, timeout=httpx.Timeout(10, read=0.1)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/chat/completions", json=chat_body(), headers=bearer(token))
    # stop() ends the pending delay at once rather than after 30 s.
    started = time.monotonic()
    standin.stop()
    assert time.monotonic() - started < 5


def test_fault_for_unknown_endpoint_is_refused(standin):
    with pytest.raises(ValueError):
        standin.add_fault("nope", Fault())


# --- TLS, plain HTTP, configuration --------------------------------------------------------------


def test_tls_is_verified_with_ca_path_only(standin, token):
    for host in ("localhost", "127.0.0.1"):
        url = f"https://{host}:{standin.port}/v1/models"
        r = get(url, headers=bearer(token), verify=standin.client_ssl_context())
        assert r.status_code == 200
    with pytest.raises(httpx.ConnectError):
        get(f"{standin.base_url}/v1/models")  # the system trust store knows no stand-in CA
    written = {p.name for p in standin.ca_path.parent.iterdir()}
    assert written >= {"ca.pem", "server.pem", "server.key"}


def test_plain_http_stand_in_points_resource_url_at_itself(make_standin):
    s = make_standin(tls=False)
    assert s.base_url == f"http://localhost:{s.port}"
    assert s.ca_path is None
    tokens = s.mint_tokens()
    assert tokens["resource_url"] == f"http://localhost:{s.port}"
    r = get(f"{s.api_base_url}/models", headers=bearer(tokens["access_token"]))
    assert r.status_code == 200


def test_resource_url_can_be_configured_with_the_port_filled_in(make_standin):
    s = make_standin(resource_url="portal.qwen.ai:{port}")
    assert s.mint_tokens()["resource_url"] == f"portal.qwen.ai:{s.port}"


def test_stand_in_without_cert_dir_cleans_up_its_temp_dir():
    with StandIn() as s:
        ca = s.ca_path
        assert ca.exists()
    assert not ca.exists()


# --- controls over HTTP (for other processes) ----------------------------------------------------


def test_http_controls_approve_revoke_and_count(standin, http, token):
    assert http.post("/_standin/approve").status_code == 404  # nothing pending yet
    verifier, challenge = pkce()
    flow = start_flow(http, challenge)
    r = http.post("/_standin/approve", json={})
    assert r.json() == {"user_code": flow["user_code"], "state": "approved"}
    assert poll(http, flow["device_code"], verifier).status_code == 200

    flow = start_flow(http, challenge)
    r = http.post("/_standin/deny", data={"user_code": flow["user_code"]})
    assert r.json()["state"] == "denied"

    assert http.post("/_standin/revoke_access").json()["tokens"] == 2
    assert http.get("/v1/models", headers=bearer(token)).status_code == 401
    assert http.post("/_standin/revoke_refresh").json()["tokens"] == 2
    counts = http.get("/_standin/counts").json()
    assert counts["device_code"] == 2
    assert counts["unauthorized"] == 1


# --- processes -----------------------------------------------------------------------------------


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 30) -> list[str]:
    """Lines a child printed up to and including the one containing `marker`.

    A child that never prints it is killed after `timeout`, which ends the read instead of
    hanging the suite.
    """
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                return lines
    finally:
        watchdog.cancel()
    raise AssertionError(f"{marker!r} never printed; got {lines}")


@pytest.mark.slow
def test_cli_serves_until_sigterm(tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qwenproxy.standin",
            "--port",
            "0",
            "--tls",
            "--cert-dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out = read_until(proc, "CA certificate:")
        base_url = re.search(r"listening on (\S+)", "".join(out)).group(1)
        r = get(
            f"{base_url}/_standin/counts",
            verify=ssl.create_default_context(cafile=tmp_path / "ca.pem"),
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "stopped" in stdout
    assert "GET /_standin/counts 200" in stderr


@pytest.mark.slow
def test_mitmproxy_verifies_the_stand_in_against_its_ca(standin, token, tmp_path):
    mitmdump = os.path.join(os.path.dirname(sys.executable), "mitmdump")
    with subprocess.Popen(
        [
            mitmdump,
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--mode",
            f"reverse:{standin.base_url}",
            "--set",
            f"confdir={tmp_path / 'mitmproxy'}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={standin.ca_path}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        try:
            out = read_until(proc, "listening at")
            address = re.search(r"listening at (\S+?)\.?$", out[-1].strip()).group(1)
            r = get(f"http://{address}/v1/models", headers=bearer(token))
            assert r.status_code == 200, r.text
        finally:
            proc.terminate()
    assert standin.counts["models"] == 1
