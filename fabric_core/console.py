"""What every Policycast command prints through: a console for output, one for errors, and failures.

An error an operator can act on is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from typing import NoReturn, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.text import Text

stdout = Console()
stderr = Console(stderr=True)
SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    # As plain text (not markup: "[::1]" is no style) on one line, however wide (soft_wrap).
    stderr.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True, highlight=False)
    raise SystemExit(code)


def load_settings(kind: type[SettingsT]) -> SettingsT:
    """Settings of `kind` from the environment, or a one-line failure naming the bad variable."""
    try:
        return kind()
    except ValidationError as exc:
        first = exc.errors()[0]
        prefix = str(kind.model_config.get("env_prefix", ""))
        where = str(first["loc"][0]).upper() if first["loc"] else "?"
        fail(f"invalid {prefix}{where} setting: {first['msg']}")
