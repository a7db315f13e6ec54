"""Settings of the minimal Django example. ``HOLYSHEEP`` holds the Client's options."""

import json
import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = ["ask"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "holysheep_site.urls"
DATABASES = {}
USE_TZ = True

# Any keyword argument of holysheep_lb.Client; the key defaults to $HOLYSHEEP_API_KEY.
HOLYSHEEP = {
    "nodes": json.loads(os.environ["HOLYSHEEP_NODES"]) if os.environ.get("HOLYSHEEP_NODES") else None,
    "default_model": os.environ.get("HOLYSHEEP_MODEL", "deepseek-v3.2"),
    "deadline_s": 30.0,
}
# The models a request may ask for (ask.views refuses others with a 400): every model
# name gets its own circuit breaker and spend row, in Redis too with shared state.
HOLYSHEEP_ALLOWED_MODELS = [
    name.strip()
    for name in os.environ.get("HOLYSHEEP_ALLOWED_MODELS", f"{HOLYSHEEP['default_model']},gpt-4.1").split(",")
    if name.strip()
]
