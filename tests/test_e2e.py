"""End to end: a real `mitmdump -s addon/qwen_addon.py` between real clients (curl, httpx, the
openai SDK) and the stand-in, over real sockets and TLS on both sides."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading

import httpx
import pytest

from .conftest import CHAT, proxy_for, seed, through
from .harness import Mitmdump, clean_env

pytestmark = pytest.mark.slow


def curl(proxy: Mitmdump, url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--suppress-connect-headers",
            "--proxy",
            proxy.proxy_url,
            "--cacert",
            str(proxy.ca_cert),
            "-D",
            "-",
            url,
            *args,
        ],
        capture_output=True,
        env=clean_env(),
        timeout=60,
        check=True,
    ).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
def test_curl_gets_503_with_the_login_link_then_200_after_approval(standin, start_proxy):
    proxy = start_proxy()
    url = f"{standin.base_url}/v1/chat/completions"
    post = (
        "-H",
        "Content-Type: application/json",
        "-H",
        "Authorization: Bearer sk-dummy",
        "-d",
        json.dumps(CHAT),
    )

    status, headers, body = curl(proxy, url, *post)
    assert status == 503
    assert headers["retry-after"] == "1"
    error = json.loads(body)["error"]
    assert error["code"] == "login_required"
    assert error["user_code"] in standin.pending_user_codes()
    assert error["login_url"].startswith(standin.base_url + "/authorize")
    assert error["login_url"] in error["message"] and error["expires_in"] > 0
    assert standin.counts["chat"] == 0, "nothing went upstream"
    proxy.wait_for_log(error["user_code"])  # the login box shows the same code

    mark = len(proxy.lines)
    standin.approve(error["user_code"])
    proxy.wait_for_log("Qwen login approved", start=mark)

    status, _, body = curl(proxy, url, *post)
    assert status == 200, body
    assert json.loads(body)["object"] == "chat.completion"
    sent = standin.requests[-1].headers
    assert sent["Authorization"] != "Bearer sk-dummy" and sent["Authorization"].startswith("Bearer ")
    assert sent["X-DashScope-AuthType"] == "qwen-oauth"
    assert sent["User-Agent"].startswith("QwenCode/")
    assert standin.counts["device_code"] == 1


def test_openai_sdk_in_reverse_mode_succeeds_through_its_own_retries(standin, start_proxy):
    import openai

    proxy = start_proxy(mode=f"reverse:{standin.base_url}")
    approver = threading.Thread(target=lambda: standin.approve(standin.wait_for_device_code(30)), daemon=True)
    approver.start()
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{proxy.port}/v1", api_key="not-a-real-key", max_retries=20
    )
    completion = client.chat.completions.create(**CHAT)
    approver.join()
    assert completion.choices[0].message.content
    assert standin.counts["device_code"] == 1
    assert standin.counts["chat"] >= 1


async def test_hundred_concurrent_requests_cause_one_device_authorization(standin, start_proxy):
    proxy = start_proxy()
    async with through(proxy) as client:
        answers = await asyncio.gather(
            *(client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT) for _ in range(100))
        )
    assert {a.status_code for a in answers} == {503}
    assert len({a.json()["error"]["user_code"] for a in answers}) == 1
    assert standin.counts["device_code"] == 1


async def test_expired_token_is_refreshed_once_for_fifty_concurrent_requests(standin, start_proxy, tmp_path):
    seed(standin, tmp_path / "qwen", expired=True)
    proxy = start_proxy()
    async with through(proxy) as client:
        answers = await asyncio.gather(
            *(client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT) for _ in range(50))
        )
    assert [a.status_code for a in answers] == [200] * 50
    assert standin.counts["token_refresh"] == 1
    assert standin.counts["device_code"] == 0


async def test_streamed_completion_reaches_the_client_before_upstream_finishes(
    standin, start_proxy, tmp_path
):
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy()
    standin.hold_streams()
    async with through(proxy) as client:
        async with client.stream(
            "POST", f"{standin.base_url}/v1/chat/completions", json={**CHAT, "stream": True}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            first = await anext(lines)
            while not first:
                first = await anext(lines)
            # The upstream is still holding the rest of the stream: chunk 1 came through alone.
            assert first.startswith("data: {")
            assert json.loads(first[6:])["object"] == "chat.completion.chunk"
            standin.release_streams()
            rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert len(rest) >= 2


async def test_requests_to_other_hosts_are_untouched(standin, start_proxy, tmp_path):
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy()
    other = f"https://127.0.0.1:{standin.port}/v1/models"  # same server, but not a Qwen host name
    async with through(proxy) as client:
        response = await client.get(other, headers={"Authorization": "Bearer client-own-key"})
    assert response.status_code == 401
    sent = standin.requests[-1].headers
    assert sent["Authorization"] == "Bearer client-own-key"
    assert "X-DashScope-AuthType" not in sent
    assert not sent.get("User-Agent", "").startswith("QwenCode/")


async def test_plain_http_through_the_regular_proxy_to_a_loopback_api(make_standin, start_proxy, tmp_path):
    standin = make_standin(tls=False)
    seed(standin, tmp_path / "qwen")
    proxy = start_proxy(standin=standin)
    async with httpx.AsyncClient(proxy=proxy.proxy_url, timeout=30) as client:
        answer = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
    assert standin.base_url.startswith("http://localhost:")
    assert answer.status_code == 200
    assert standin.requests[-1].headers["X-DashScope-AuthType"] == "qwen-oauth"


async def test_upstream_mode_injects_and_recovers_a_401_through_the_upstream_proxy(
    standin, start_proxy, tmp_path, mitm_confdir
):
    seed(standin, tmp_path / "qwen")
    # The next proxy in the chain: a bare mitmdump that only tunnels.
    with proxy_for(
        standin, mitm_confdir, tmp_path / "unused", with_addon=False, options={"ignore_hosts": [".*"]}
    ) as upstream:
        proxy = start_proxy(mode=f"upstream:http://127.0.0.1:{upstream.port}")
        async with through(proxy) as client:
            first = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
            standin.revoke_access_tokens()
            second = await client.post(f"{standin.base_url}/v1/chat/completions", json=CHAT)
        tunnels = upstream.log.count("client connect")
    assert tunnels == 2, "one tunnel for the proxy's traffic, one for the retry with the new token"
    assert first.status_code == 200
    assert second.status_code == 200, "refreshed, and resent through the upstream proxy"
    assert standin.counts["token_refresh"] == 1 and standin.counts["unauthorized"] == 1


@needs_curl
def test_http2_clients_get_the_token_and_the_503_too(standin, start_proxy):
    # Lazy, without upstream cert sniffing: mitmproxy offers HTTP/2 to the client without asking
    # the (HTTP/1.1-only) stand-in first, and translates.
    proxy = start_proxy(connection_strategy="lazy", upstream_cert="false")
    url = f"{standin.base_url}/v1/chat/completions"
    post = (
        "--http2",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(CHAT),
        "-w",
        "%{http_version}",
    )
    status, _, body = curl(proxy, url, *post)
    assert status == 503 and body.endswith(b"2"), "answered over HTTP/2"
    assert json.loads(body[:-1])["error"]["user_code"]
    mark = len(proxy.lines)
    standin.approve()
    proxy.wait_for_log("Qwen login approved", start=mark)
    status, _, body = curl(proxy, url, *post)
    assert status == 200 and body.endswith(b"2")
    assert standin.requests[-1].headers["X-DashScope-AuthType"] == "qwen-oauth"
