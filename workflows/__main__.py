"""`python -m workflows` runs the nodepatch CLI."""

from __future__ import annotations

from workflows.cli import main

main()
