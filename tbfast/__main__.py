"""``python -m tbfast`` runs the ``tbfast`` command line."""

from .cli import main

raise SystemExit(main())
