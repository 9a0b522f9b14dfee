"""``python -m pyorchestrate``: the ``pyorchestrate`` command."""

from .cli import main

raise SystemExit(main())
