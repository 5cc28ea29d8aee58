"""Operating it like a product, end to end with a real mitmdump: 401 recovery, hold mode, the
status page and its login trigger, tokens kept out of saved flows and HAR files, replay."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

import httpx
import pytest
from mitmproxy import io as mitmio

from qwenproxy.standin import Fault
from qwenproxy.store import CredentialStore

from .conftest import CHAT, proxy_for, seed, through
from .harness import SCRIPT

pytestmark = pytest.mark.slow


def chat_url(standin) -> str:
    return f"{standin.base_url}/v1/chat/completions"


async def test_revoked_access_token_is_refreshed_once_and_no_401_reaches_the_client(
    standin, start_proxy, tmp_path
):
    old = seed(standin, tmp_path / "qwen")
    proxy = start_proxy()
    async with through(proxy) as client:
        assert (await client.post(chat_url(standin), json=CHAT)).status_code == 200
        standin.revoke_access_tokens()
        answers = await asyncio.gather(*(client.post(chat_url(standin), json=CHAT) for _ in range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert standin.counts["token_refresh"] == 1
    assert standin.counts["unauthorized"] >= 1, "the upstream did reject the revoked token"
    assert all(a.json()["object"] == "chat.completion" for a in answers)
    assert standin.requests[-1].headers["Authorization"] != f"Bearer {old.access_token}"


async def test_dead_refresh_token_gives_503_and_starts_a_login(standin, start_proxy, tmp_path):
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy()
    standin.revoke_access_tokens()
    standin.revoke_refresh_tokens()
    async with through(proxy) as client:
        answer = await client.post(chat_url(standin), json=CHAT)
    assert answer.status_code == 503
    assert answer.json()["error"]["user_code"] in standin.pending_user_codes()
    assert standin.counts["device_code"] == 1


async def test_hold_mode_lets_a_client_without_retries_get_200_after_approval(standin, start_proxy):
    proxy = start_proxy(qwen_hold=20)
    approver = threading.Thread(target=lambda: standin.approve(standin.wait_for_device_code(30)), daemon=True)
    approver.start()
    async with through(proxy) as client:
        answer = await client.post(chat_url(standin), json=CHAT)
    approver.join()
    assert answer.status_code == 200
    assert standin.counts["device_code"] == 1


async def test_hold_mode_does_not_block_other_traffic(standin, start_proxy, tmp_path):
    proxy = start_proxy(qwen_hold=20)
    async with through(proxy) as client:
        held = asyncio.create_task(client.post(chat_url(standin), json=CHAT))
        await asyncio.to_thread(standin.wait_for_device_code, 30)
        # While that request waits, other hosts and the status page answer at once.
        other = await client.get(f"https://127.0.0.1:{standin.port}/v1/models")
        page = await client.get("http://qwen.auth/status.json")
        assert other.status_code == 401 and page.json()["state"] == "login_pending"
        assert not held.done()
        standin.approve()
        assert (await held).status_code == 200


async def test_status_api_reports_each_state(standin, start_proxy):
    proxy = start_proxy()
    async with through(proxy) as client:
        state = (await client.get("http://qwen.auth/", headers={"Accept": "application/json"})).json()
        assert state["state"] == "logged_out" and state["login"] is None

        assert (await client.post(chat_url(standin), json=CHAT)).status_code == 503
        state = (await client.get("http://qwen.auth/status.json")).json()
        assert state["state"] == "login_pending"
        assert state["login"]["user_code"] in standin.pending_user_codes()
        assert state["login"]["expires_in"] > 0
        assert state["counters"]["unavailable"] == 1

        mark = len(proxy.lines)
        standin.approve()
        proxy.wait_for_log("Qwen login approved", start=mark)
        state = (await client.get("http://qwen.auth/status.json")).json()
        assert state["state"] == "valid" and state["expires_in"] > 0
        assert state["endpoint"] == standin.api_base_url
        text = json.dumps(state)
        assert all(t not in text for t in ("access_token", "refresh_token", "Bearer"))


def test_status_page_at_the_reserved_path_in_reverse_mode(standin, start_proxy, tmp_path):
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy(mode=f"reverse:{standin.base_url}")
    page = httpx.get(f"http://127.0.0.1:{proxy.port}/__qwen__/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    data = httpx.get(f"http://127.0.0.1:{proxy.port}/__qwen__/status.json").json()
    assert data["state"] == "valid"
    assert standin.counts["chat"] == standin.counts["models"] == 0, "the status page never goes upstream"


def test_login_trigger_from_loopback_starts_a_login(standin, start_proxy):
    proxy = start_proxy(mode=f"reverse:{standin.base_url}")
    answer = httpx.post(f"http://127.0.0.1:{proxy.port}/__qwen__/login")
    assert answer.status_code == 200 and answer.json()["ok"] is True
    standin.wait_for_device_code(10)
    assert standin.counts["device_code"] == 1


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_non_loopback_clients_are_refused(standin, tmp_path, start_proxy):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy(mode=f"reverse:{standin.base_url}", listen_host=address)
    base = f"http://{address}:{proxy.port}"
    login = httpx.post(f"{base}/__qwen__/login")
    chat = httpx.post(f"{base}/v1/chat/completions", json=CHAT)
    assert login.status_code == 403 and chat.status_code == 403
    assert "qwen_allow_remote" in chat.json()["error"]["message"]
    assert standin.counts["device_code"] == 0 and standin.counts["chat"] == 0


def test_saved_flows_and_har_hold_no_token_and_replay_works(standin, tmp_path, mitm_confdir):
    creds = seed(standin, tmp_path / "qwen")
    flows, har = tmp_path / "flows.mitm", tmp_path / "flows.har"
    reverse = f"reverse:{standin.base_url}"
    home = tmp_path / "qwen"
    with proxy_for(
        standin, mitm_confdir, home, reverse, options={"hardump": har}, args=["-w", str(flows)]
    ) as proxy:
        for stream in (False, True):
            answer = httpx.post(
                f"http://127.0.0.1:{proxy.port}/v1/chat/completions", json={**CHAT, "stream": stream}
            )
            assert answer.status_code == 200
    for path in (flows, har):
        data = path.read_bytes()
        assert creds.access_token.encode() not in data and creds.refresh_token.encode() not in data
        assert b"qwen token redacted" in data
    with flows.open("rb") as f:
        saved = list(mitmio.FlowReader(f).stream())
    assert len(saved) == 2
    assert all(
        flow.request.headers["Authorization"].startswith("Bearer <qwen token redacted") for flow in saved
    )

    # Replaying the saved flows: the addon injects a fresh token again.
    replayed = tmp_path / "replayed.mitm"
    before = standin.counts["chat"]
    with proxy_for(
        standin,
        mitm_confdir,
        home,
        reverse,
        options={"flow_detail": 1},
        args=["-C", str(flows), "-w", str(replayed)],
    ) as proxy:
        first = proxy.wait_for_log(r"<< 200", timeout=30)
        proxy.wait_for_log(r"<< 200", timeout=30, start=proxy.lines.index(first) + 1)
    assert standin.counts["chat"] == before + 2
    with replayed.open("rb") as f:
        again = [flow for flow in mitmio.FlowReader(f).stream() if flow.response]
    assert again and all(flow.response.status_code == 200 for flow in again)
    assert creds.access_token.encode() not in replayed.read_bytes()


async def test_no_log_line_holds_a_token_even_at_full_verbosity(standin, start_proxy, tmp_path):
    old = seed(standin, tmp_path / "qwen", expired=True)
    proxy = start_proxy(flow_detail=4, termlog_verbosity="debug")
    async with through(proxy) as client:
        assert (await client.post(chat_url(standin), json=CHAT)).status_code == 200  # refreshed
        standin.revoke_access_tokens()
        assert (await client.post(chat_url(standin), json={**CHAT, "stream": True})).status_code == 200
    new = CredentialStore(tmp_path / "qwen").load()
    assert new.access_token in {r.headers["Authorization"].removeprefix("Bearer ") for r in standin.requests}
    proxy.stop()
    log = proxy.log
    assert "Authorization" in log, "flow_detail=4 prints request headers"
    sent = {r.headers["Authorization"].removeprefix("Bearer ") for r in standin.requests}
    assert len(sent) == 2, "the refreshed token, then the one after the revocation"
    for secret in (old.access_token, old.refresh_token, new.refresh_token, *sent):
        assert secret not in log


async def test_rejected_token_on_a_streamed_request_body_gives_a_clear_retryable_error(
    standin, start_proxy, tmp_path
):
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy(stream_large_bodies="2k")  # a long prompt's body streams upstream
    long_prompt = {**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}
    standin.revoke_access_tokens()
    async with through(proxy) as client:
        first = await client.post(chat_url(standin), json=long_prompt)
        second = await client.post(chat_url(standin), json=long_prompt)
    assert "Streaming request" in proxy.log
    assert first.status_code == 503 and first.headers["Retry-After"] == "0"
    assert first.json()["error"]["code"] == "retry_request"
    assert "cannot be sent again" in first.json()["error"]["message"]
    assert second.status_code == 200, "the token was refreshed meanwhile"
    assert standin.counts["token_refresh"] == 1


def test_script_hot_reload_during_a_pending_login_leaves_nothing_behind(standin, start_proxy, tmp_path):
    script = tmp_path / "qwen_addon.py"
    script.write_text(SCRIPT.read_text())
    proxy = start_proxy(mode=f"reverse:{standin.base_url}", script=script)
    url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
    first = httpx.post(url, json=CHAT, timeout=30).json()["error"]["user_code"]

    mark = len(proxy.lines)
    script.write_text(SCRIPT.read_text() + "\n# edited\n")  # mitmproxy notices and reloads
    proxy.wait_for_log("Loading script", start=mark)
    proxy.wait_for_log("not logged in to Qwen", start=mark)  # the new addon is running

    second = httpx.post(url, json=CHAT, timeout=30).json()["error"]["user_code"]
    assert second != first, "the old addon's login was cancelled with it; a fresh one started"
    standin.approve(second)
    proxy.wait_for_log("Qwen login approved", start=mark)
    assert httpx.post(url, json=CHAT, timeout=30).status_code == 200
    assert proxy.stop() == 0
    assert "Traceback" not in proxy.log and "Task was destroyed" not in proxy.log
    assert not (tmp_path / "qwen" / "oauth_creds.lock").exists()


async def test_a_persistent_403_causes_one_refresh_not_one_per_request(standin, start_proxy, tmp_path):
    seed(standin, tmp_path / "qwen")
    forbidden = {
        "error": {"message": "model not allowed", "type": "invalid_request_error", "code": "forbidden"}
    }
    standin.add_fault("chat", Fault(status=403, body=forbidden), times=10)
    proxy = start_proxy()
    async with through(proxy) as client:
        answers = [await client.post(chat_url(standin), json=CHAT) for _ in range(5)]
    assert [a.status_code for a in answers] == [403] * 5
    assert answers[-1].json()["error"]["message"] == "model not allowed"
    assert standin.counts["token_refresh"] == 1, "refreshed once; then the 403 is not the token's fault"
    assert standin.counts["faults"] == 6  # 5 requests + the one retry after the refresh
