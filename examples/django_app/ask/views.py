"""``POST /ask {"prompt": "...", "model": "..."}`` answered through the shared holysheep_lb Client.

``model`` is optional and must be one of ``settings.HOLYSHEEP_ALLOWED_MODELS``.
"""

from __future__ import annotations

import json
import logging
import os

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from holysheep_lb import HolySheepError
from holysheep_lb.web import error_response

from .holysheep import get_client

log = logging.getLogger(__name__)


@csrf_exempt  # a JSON API without cookie auth
@require_POST
def ask(request):
    try:
        payload = json.loads(request.body or b"{}")
    except ValueError:
        payload = None
    prompt = payload.get("prompt") if isinstance(payload, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return JsonResponse({"error": {"type": "invalid_request",
                                       "message": "send a JSON body with a non-empty 'prompt'"}}, status=400)
    model = payload.get("model")
    allowed = settings.HOLYSHEEP_ALLOWED_MODELS
    if model is not None and not (isinstance(model, str) and model in allowed):
        return JsonResponse({"error": {"type": "invalid_request",  # the refused name is not echoed back
                                       "message": "unknown 'model'; one of: " + ", ".join(sorted(allowed))}},
                            status=400)
    try:
        resp = get_client().chat_completion([{"role": "user", "content": prompt}], model=model)
    except HolySheepError as exc:
        status, body, headers = error_response(exc)
        log.warning("AI call failed (answering %d): %s", status, exc)
        return JsonResponse(body, status=status, headers=headers)
    return JsonResponse({"answer": resp.text, "model": resp.model, "node": resp.node_id,
                         "region": resp.region, "attempts": len(resp.attempts),
                         "latency_ms": round(resp.latency_ms, 1), "pid": os.getpid()})
