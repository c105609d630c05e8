"""LLM clients: an OpenAI-compatible endpoint (retries, timeouts, errors) and a local transformers model."""

from __future__ import annotations

import socket

import pytest

from optuna_prune.model.llm import LLMError, OpenAIChat, TransformersChat, make_llm
from tests._chat_server import ChatServer

MESSAGES = [{"role": "system", "content": "Reply with a list."}, {"role": "user", "content": "Go."}]


def test_openai_chat_posts_the_request_and_returns_the_content():
    server = ChatServer(lambda body: "[1, 2, 3]")
    with server.running():
        llm = OpenAIChat(server.url, "served-name", timeout=5, api_key="tok")
        assert llm.complete(MESSAGES, max_tokens=12, temperature=0.5, seed=7) == "[1, 2, 3]"
    body = server.requests[0]
    assert body == {"messages": MESSAGES, "max_tokens": 12, "temperature": 0.5, "seed": 7, "model": "served-name"}
    assert server.headers[0]["Authorization"] == "Bearer tok"


def test_openai_chat_ignores_proxy_environment(monkeypatch):
    """Requests go to the configured address only, even when a proxy is set in the environment."""
    monkeypatch.setenv("http_proxy", "http://203.0.113.1:9")  # TEST-NET: would never answer
    monkeypatch.setenv("HTTP_PROXY", "http://203.0.113.1:9")
    server = ChatServer(lambda body: "ok")
    with server.running():
        assert OpenAIChat(server.url, timeout=5, retries=0).complete(MESSAGES) == "ok"


def test_server_error_is_retried_then_reported_in_one_line():
    answers = iter([500, 503, "[4]"])
    server = ChatServer(lambda body: next(answers))
    with server.running():
        llm = OpenAIChat(server.url, timeout=5, retries=2, backoff=0.01)
        assert llm.complete(MESSAGES) == "[4]"  # two failures, third try answers
        assert len(server.requests) == 3
        server.respond = lambda body: 500
        with pytest.raises(LLMError, match=r"failed after 3 tries: HTTP 500") as err:
            llm.complete(MESSAGES)
    assert "\n" not in str(err.value)


def test_client_error_is_not_retried():
    server = ChatServer(lambda body: 400)
    with server.running(), pytest.raises(LLMError, match="after 1 tries: HTTP 400"):
        OpenAIChat(server.url, timeout=5, retries=3, backoff=0.01).complete(MESSAGES)
    assert len(server.requests) == 1


def test_timeout_and_unreachable_endpoint_raise_llm_error():
    server = ChatServer(lambda body: "late", delay=1.0)
    with server.running(), pytest.raises(LLMError, match="failed after 2 tries"):
        OpenAIChat(server.url, timeout=0.2, retries=1, backoff=0).complete(MESSAGES)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LLMError, match=f"127.0.0.1:{port}/v1/chat/completions failed after 1 tries"):
        OpenAIChat(f"http://127.0.0.1:{port}/v1", timeout=2, retries=0).complete(MESSAGES)


def test_malformed_response_is_an_llm_error():
    server = ChatServer(lambda body: {"choices": []})
    with server.running(), pytest.raises(LLMError, match=r"without choices\[0\]\.message\.content"):
        OpenAIChat(server.url, timeout=5, retries=0).complete(MESSAGES)


def test_make_llm_reads_the_spec():
    assert isinstance(make_llm("local:smollm2-135m"), TransformersChat)
    remote = make_llm("http://127.0.0.1:8000/v1/", "m", timeout=3)
    assert isinstance(remote, OpenAIChat) and remote.base_url == "http://127.0.0.1:8000/v1"
    assert remote.timeout == 3
    for bad in ("smollm2-135m", "local:", "ftp://host/v1"):
        with pytest.raises(ValueError, match="local:<model>"):
            make_llm(bad)


def test_transformers_chat_is_lazy_greedy_and_seeded(tiny_checkpoint):
    llm = TransformersChat(str(tiny_checkpoint), device="cpu")
    assert llm._loaded is None  # nothing loaded until the first question
    greedy = llm.complete(MESSAGES, max_tokens=6, temperature=0.0, seed=1)
    assert isinstance(greedy, str) and greedy == llm.complete(MESSAGES, max_tokens=6, temperature=0.0, seed=2)
    a = llm.complete(MESSAGES, max_tokens=6, temperature=1.0, seed=3)
    assert a == llm.complete(MESSAGES, max_tokens=6, temperature=1.0, seed=3)
