"""`nodepatch config check [FILE]` and `nodepatch config schema`: the configuration file."""

from __future__ import annotations

import json
from typing import Any

import click

from workflows.cli.common import emit, json_option

SCHEMA_ID = "https://nodepatch.invalid/config.schema.json"


@click.group("config")
def config_group() -> None:
    """Check the configuration file, or print its JSON Schema."""


@config_group.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def config_check_cmd(ctx: click.Context, file: str | None, as_json: bool) -> None:
    """Validate FILE (default: --config / NODEPATCH_CONFIG) and print the effective
    configuration, every default filled in and secrets masked. Exit 2 if it is invalid."""
    from workflows import settings

    path = file or ctx.find_root().params.get("config_path")
    loaded = settings.load(path)
    effective = effective_config(loaded)
    if as_json:
        emit({"file": path, "valid": True, "config": effective})
        return
    import yaml

    click.echo(f"# {path or 'no configuration file: the defaults'}: valid")
    click.echo(yaml.safe_dump(effective, sort_keys=False, allow_unicode=True).rstrip())


def effective_config(loaded: Any) -> dict[str, Any]:
    """The validated configuration with its defaults (keys left unset omitted), as JSON-able
    data; the database URL is shown with its password hidden (no other secret is ever in the
    file)."""
    from workflows import config
    from workflows.app import shown_url

    model = loaded.model if loaded.model is not None else config.validate({})
    data: dict[str, Any] = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["database"] = shown_url(loaded.database)
    return data


@config_group.command("schema")
def config_schema_cmd() -> None:
    """Print the configuration's JSON Schema (for an editor's YAML language server)."""
    from workflows import config

    schema = config.Config.model_json_schema(by_alias=True)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
        "title": "nodepatch configuration",
    }
    click.echo(json.dumps(schema, indent=2, ensure_ascii=False))
