"""The configuration table README shows, generated from the settings class."""

from __future__ import annotations

from pydantic import SecretStr

from fedmq.settings import Settings

BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def _default(value: object) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    mib = 1024 * 1024
    if isinstance(value, int) and not isinstance(value, bool) and value and value % mib == 0:
        return f"{value // mib} MiB ({value})"
    return str(value)


def markdown() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        rows.append(
            f"| `{prefix}{name.upper()}` | `{_default(default)}` | {field.description or ''} |"
        )
    return "\n".join(rows)


def replace_in(text: str) -> str:
    """Put the current table between the README markers."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{markdown()}\n{END}{tail}"
