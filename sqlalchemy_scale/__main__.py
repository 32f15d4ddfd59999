"""``python -m sqlalchemy_scale demo|status``."""

from .cli import main

raise SystemExit(main())
