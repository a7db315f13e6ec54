"""WSGI entry point: ``gunicorn holysheep_site.wsgi`` (from examples/django_app)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "holysheep_site.settings")
application = get_wsgi_application()
