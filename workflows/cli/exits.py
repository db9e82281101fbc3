"""The exit codes of every command (README, "Exit codes")."""

from __future__ import annotations

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED, EXIT_BUSY, EXIT_WARNINGS = 0, 1, 2, 3, 4, 5
