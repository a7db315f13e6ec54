"""``python -m holysheep_lb``: the ``holysheep-lb`` command."""

from .cli import main

raise SystemExit(main())
