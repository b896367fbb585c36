"""The one rich console every command writes its progress, tables and warnings to (stderr: stdout stays data)."""

from rich.console import Console

console = Console(stderr=True)
