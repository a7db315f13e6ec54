"""Every example in examples/, run against the simulated gateway on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from holysheep_lb import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DJANGO_DIR = EXAMPLES / "django_app"


def wait_until(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        pause.wait(0.05)
    return predicate()


@pytest.fixture
def gateway(gateway_factory):
    return gateway_factory([{"id": "a", "region": "us-east"}, {"id": "b", "region": "eu-west"}], seed=11)


def example_env(gateway, **extra) -> dict:
    """The environment of an example process: nodes from the simulator, no real key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLYSHEEP_")}
    env["HOLYSHEEP_NODES"] = json.dumps(gateway.client_nodes())
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def run_script(args, env, timeout_s=60.0):
    return subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT)


# -- basic.py --------------------------------------------------------------------------------


def test_basic_example_answers_from_env_nodes(gateway):
    gateway.configure("a", fault="refuse")
    proc = run_script([EXAMPLES / "basic.py", "What is 2+2?"], example_env(gateway))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[deepseek-v3.2] Echo: What is 2+2?\n"
    assert "answered by b (eu-west)" in proc.stderr


def test_basic_example_takes_nodes_as_arguments(gateway):
    env = {k: v for k, v in example_env(gateway).items() if k != "HOLYSHEEP_NODES"}
    proc = run_script([EXAMPLES / "basic.py", "--base-url", gateway.base_url("b"), "--model", "gpt-4.1",
                       "hello"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[gpt-4.1] Echo: hello\n"
    assert gateway.request_count("b", "/v1/chat/completions") == 1


# -- cron_batch.py ---------------------------------------------------------------------------


def test_cron_batch_answers_every_prompt_in_file_order(gateway, tmp_path):
    prompts = [f"prompt number {i}" for i in range(25)]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts[:10]) + "\n\n   \n" + "\n".join(prompts[10:]) + "\n")
    gateway.configure("a", error_rate=0.3)  # failover absorbs these
    proc = run_script([EXAMPLES / "cron_batch.py", path, "--workers", "6"], example_env(gateway))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == ["ok"] * 25
    assert [r[2] for r in rows] == prompts
    assert [r[3] for r in rows] == [f"[deepseek-v3.2] Echo: {p}" for p in prompts]
    assert "25 prompts in" in proc.stderr and ": 25 ok, 0 failed" in proc.stderr
    assert re.search(r"tokens: \d+ prompt, \d+ completion", proc.stderr)
    assert "... 25/25" in proc.stderr


def test_cron_batch_reports_failures_and_exits_1(gateway, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("one\ntwo\nthree\n")
    gateway.configure("a", fault="refuse")
    gateway.configure("b", fault="refuse")
    proc = run_script([EXAMPLES / "cron_batch.py", path], example_env(gateway))
    assert proc.returncode == 1
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [(r[0], r[2]) for r in rows] == [("FAIL", "one"), ("FAIL", "two"), ("FAIL", "three")]
    assert all(r[3].startswith("AllAttemptsFailedError: ") for r in rows)
    assert ": 0 ok, 3 failed" in proc.stderr


# -- flask_app.py ----------------------------------------------------------------------------


@pytest.fixture
def flask_app_module(monkeypatch):
    pytest.importorskip("flask")
    spec = importlib.util.spec_from_file_location("flask_app_example", EXAMPLES / "flask_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    registered = []
    monkeypatch.setattr(module, "atexit", SimpleNamespace(register=registered.append))
    module.registered_at_exit = registered
    return module


def test_flask_view_answers_with_json_and_closes_its_client_at_exit(flask_app_module, gateway, monkeypatch):
    monkeypatch.delenv("HOLYSHEEP_API_KEY", raising=False)
    monkeypatch.setenv("HOLYSHEEP_NODES", json.dumps(gateway.client_nodes()))
    app = flask_app_module.create_app()
    client = app.extensions["holysheep"]
    web = app.test_client()
    for i in range(3):
        resp = web.post("/ask", json={"prompt": f"question {i}"})
        assert resp.status_code == 200
        body = resp.get_json()
        assert body["answer"] == f"[deepseek-v3.2] Echo: question {i}"
        assert body["pid"] == os.getpid() and body["attempts"] == 1 and body["node"] in ("a", "b")
    assert client.stats()["calls"] == 3  # one Client for every request
    assert web.post("/ask", json={"prompt": "x", "model": "gpt-4.1"}).get_json()["model"] == "gpt-4.1"
    assert flask_app_module.registered_at_exit == [client.close]
    flask_app_module.registered_at_exit[0]()
    assert client.closed


def test_flask_view_refuses_a_model_outside_its_allow_list(flask_app_module, gateway):
    client = Client(nodes=gateway.client_nodes(), default_model="deepseek-v3.2", health_check_interval_s=None)
    web = flask_app_module.create_app(client).test_client()
    try:
        for model in ("no-such-model", "x" * 100_000, 42):
            resp = web.post("/ask", json={"prompt": "hi", "model": model})
            assert resp.status_code == 400
            error = resp.get_json()["error"]
            assert error["type"] == "invalid_request" and "deepseek-v3.2" in error["message"]
            assert len(resp.data) < 1000  # the refused name is not echoed back
        assert gateway.counts() == {"a": 0, "b": 0}
        assert web.post("/ask", json={"prompt": "hi", "model": "gpt-4.1"}).status_code == 200
    finally:
        client.close()


def test_flask_view_maps_errors_to_json_statuses(flask_app_module, gateway):
    client = Client(nodes=gateway.client_nodes(), default_model="m", deadline_s=3.0,
                    health_check_interval_s=None)
    web = flask_app_module.create_app(client).test_client()
    try:
        resp = web.post("/ask", json={})
        assert resp.status_code == 400 and resp.get_json()["error"]["type"] == "invalid_request"

        gateway.configure("a", rate_limit_rate=1.0, retry_after_s=30)
        gateway.configure("b", rate_limit_rate=1.0, retry_after_s=30)
        resp = web.post("/ask", json={"prompt": "hi"})
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "30"
        assert resp.get_json()["error"]["type"] == "rate_limited"

        gateway.configure("a", rate_limit_rate=0.0, fault="refuse")
        gateway.configure("b", rate_limit_rate=0.0, fault="refuse")
        client.selector.nodes[0].throttled_until = client.selector.nodes[1].throttled_until = 0.0
        resp = web.post("/ask", json={"prompt": "hi"})
        assert resp.status_code == 503
        assert resp.get_json() == {"error": {"type": "unavailable",
                                             "message": "The AI service is unavailable; retry later."}}
    finally:
        client.close()


# -- django_app/ -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_site():
    django = pytest.importorskip("django")
    from django.conf import settings

    if settings.configured and os.environ.get("DJANGO_SETTINGS_MODULE") != "holysheep_site.settings":
        pytest.skip("Django is already configured for something else in this process")
    sys.path.insert(0, str(DJANGO_DIR))
    os.environ["DJANGO_SETTINGS_MODULE"] = "holysheep_site.settings"
    django.setup()
    from ask import holysheep  # connects the settings-changed receiver

    yield holysheep
    holysheep.close_client()
    sys.path.remove(str(DJANGO_DIR))


def django_settings(gateway, **extra):
    return {"nodes": gateway.client_nodes(), "default_model": "deepseek-v3.2",
            "health_check_interval_s": None, **extra}


def test_django_view_uses_one_lazy_client_from_settings(django_site, gateway):
    from django.test import Client as DjangoClient
    from django.test import override_settings

    with override_settings(HOLYSHEEP=django_settings(gateway)):
        assert django_site._client is None  # nothing built until the first request
        web = DjangoClient()
        for i in range(3):
            resp = web.post("/ask", data={"prompt": f"q{i}"}, content_type="application/json")
            assert resp.status_code == 200
            body = resp.json()
            assert body["answer"] == f"[deepseek-v3.2] Echo: q{i}" and body["pid"] == os.getpid()
        client = django_site.get_client()
        assert client.stats()["calls"] == 3
        assert {n.id for n in client.selector.nodes} == {"a", "b"}
        assert web.post("/ask", data="not json", content_type="application/json").status_code == 400
        assert web.get("/ask").status_code == 405
    assert client.closed  # leaving override_settings rebuilt the singleton


def test_django_view_refuses_a_model_outside_its_allow_list(django_site, gateway):
    from django.test import Client as DjangoClient
    from django.test import override_settings

    with override_settings(HOLYSHEEP=django_settings(gateway)):
        web = DjangoClient()
        for model in ("no-such-model", "x" * 100_000, ["gpt-4.1"]):
            resp = web.post("/ask", data={"prompt": "hi", "model": model}, content_type="application/json")
            assert resp.status_code == 400
            error = resp.json()["error"]
            assert error["type"] == "invalid_request" and "deepseek-v3.2" in error["message"]
            assert len(resp.content) < 1000
        assert gateway.counts() == {"a": 0, "b": 0}
        resp = web.post("/ask", data={"prompt": "hi", "model": "gpt-4.1"}, content_type="application/json")
        assert resp.status_code == 200 and resp.json()["model"] == "gpt-4.1"


def test_django_client_singleton_is_built_once_under_a_thread_race(django_site, gateway, monkeypatch):
    from django.test import override_settings

    built = []

    class CountingClient(Client):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(django_site, "Client", CountingClient)
    with override_settings(HOLYSHEEP=django_settings(gateway)):
        start = threading.Barrier(16)

        def get():
            start.wait(5)
            return django_site.get_client()

        with ThreadPoolExecutor(16) as pool:
            clients = list(pool.map(lambda _: get(), range(16)))
        assert len(built) == 1
        assert all(c is clients[0] for c in clients)


def test_django_view_maps_errors_to_503(django_site, gateway):
    from django.test import Client as DjangoClient
    from django.test import override_settings

    gateway.configure("a", fault="refuse")
    gateway.configure("b", fault="refuse")
    with override_settings(HOLYSHEEP=django_settings(gateway, deadline_s=3.0)):
        resp = DjangoClient().post("/ask", data={"prompt": "hi"}, content_type="application/json")
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "unavailable"


# -- gunicorn: the Flask example with 2 preloaded workers --------------------------------------


def test_gunicorn_preloaded_workers_all_answer(gateway, tmp_path):
    pytest.importorskip("gunicorn")
    pytest.importorskip("flask")
    gateway.configure("a", latency_ms=20)
    gateway.configure("b", latency_ms=20)
    log_path = tmp_path / "gunicorn.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--workers", "2", "--preload", "--bind", "127.0.0.1:0",
         "--chdir", str(EXAMPLES), "--error-logfile", str(log_path), "--graceful-timeout", "5",
         "flask_app:create_app()"],
        env=example_env(gateway), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def booted():
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited with {proc.returncode}: {log_path.read_text()}")
            text = log_path.read_text() if log_path.exists() else ""
            listening = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            workers = re.findall(r"Booting worker with pid: (\d+)", text)
            return (int(listening.group(1)), {int(w) for w in workers}) if listening and len(workers) >= 2 else None

        ready = wait_until(booted, timeout_s=30)
        assert ready, log_path.read_text()
        port, worker_pids = ready
        local = threading.local()

        def ask(i):
            session = getattr(local, "session", None) or requests.Session()
            local.session = session
            resp = session.post(f"http://127.0.0.1:{port}/ask", json={"prompt": f"p{i}"}, timeout=10)
            return resp.status_code, resp.json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(100)))
        assert [status for status, _ in answers] == [200] * 100
        assert [body["answer"] for _, body in answers] == [f"[deepseek-v3.2] Echo: p{i}" for i in range(100)]
        pids = {body["pid"] for _, body in answers}
        assert pids == worker_pids and proc.pid not in pids  # both workers answered, not the master
        served = gateway.request_count("a", "/v1/chat/completions") + gateway.request_count(
            "b", "/v1/chat/completions")
        assert served == 100
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 0
