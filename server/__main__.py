"""`python -m server ...` entry point."""

from server.cli import main

raise SystemExit(main())
