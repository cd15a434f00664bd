"""Allow `python -m superd`."""

from superd.cli import main

raise SystemExit(main())
