"""A Flask app answering questions through holysheep_lb.

One Client per process, created when the app is set up and closed at exit; every
request thread shares it. Failures become JSON: 429 when rate limited or over budget
(with Retry-After), 503 when the AI service is unavailable, 400 for a bad request,
including a model outside ``HOLYSHEEP_ALLOWED_MODELS`` (comma-separated).

    export HOLYSHEEP_API_KEY=sk-...            # nodes: HOLYSHEEP_NODES (JSON) or HOLYSHEEP_BASE_URL
    flask --app 'flask_app:create_app()' run   # from this directory
    gunicorn -w 4 --preload 'flask_app:create_app()'
    curl -s localhost:5000/ask -H 'Content-Type: application/json' -d '{"prompt": "Hi"}'

With ``--preload`` the Client is created once in gunicorn's master; each worker gets
fresh connections and locks after the fork.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Optional

from flask import Flask, jsonify, request

from holysheep_lb import Client, HolySheepError
from holysheep_lb.web import error_response

log = logging.getLogger(__name__)

DEFAULT_MODEL = os.environ.get("HOLYSHEEP_MODEL", "deepseek-v3.2")
# A request's "model" is the caller's choice, and every model name gets its own circuit
# breaker and spend row (in Redis too, with shared state): let through only known ones.
ALLOWED_MODELS = frozenset(
    name.strip() for name in os.environ.get("HOLYSHEEP_ALLOWED_MODELS", f"{DEFAULT_MODEL},gpt-4.1").split(",")
    if name.strip())


def create_app(client: Optional[Client] = None) -> Flask:
    """The app; without ``client`` it builds one from the environment and closes it at exit."""
    app = Flask(__name__)
    if client is None:
        client = Client.from_env(default_model=DEFAULT_MODEL)
        atexit.register(client.close)
    app.extensions["holysheep"] = client

    @app.post("/ask")
    def ask():
        payload = request.get_json(silent=True) or {}
        prompt = payload.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return jsonify(error={"type": "invalid_request",
                                  "message": "send a JSON body with a non-empty 'prompt'"}), 400
        model = payload.get("model")
        if model is not None and not (isinstance(model, str) and model in ALLOWED_MODELS):
            return jsonify(error={"type": "invalid_request",  # the refused name is not echoed back
                                  "message": "unknown 'model'; one of: " + ", ".join(sorted(ALLOWED_MODELS))}), 400
        resp = client.chat_completion([{"role": "user", "content": prompt}], model=model)
        return jsonify(answer=resp.text, model=resp.model, node=resp.node_id, region=resp.region,
                       attempts=len(resp.attempts), latency_ms=round(resp.latency_ms, 1),
                       pid=os.getpid())

    @app.errorhandler(HolySheepError)
    def holysheep_failed(exc: HolySheepError):
        status, body, headers = error_response(exc)
        log.warning("AI call failed (answering %d): %s", status, exc)
        return jsonify(body), status, headers

    return app
