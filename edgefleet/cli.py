"""The `edgefleet` command.

Subcommands live with their packages and are imported only when used, so a device that installed
just the `agent` extra can run `edgefleet agent ...` without scikit-learn. Library errors become
one line on stderr and exit code 1 here, at the edge, and nowhere else.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

__all__ = ["main"]

# name -> "module:attribute" of a click command or group
_COMMANDS = {
    "compile": ("compiler.cli:compile_command", "Compile a fitted scikit-learn pipeline."),
    "bundle": ("compiler.cli:bundle", "Inspect and verify .edgebundle files."),
    "keys": ("compiler.cli:keys", "Manage Ed25519 signing keys."),
    "agent": ("edge_agent.cli:agent", "Run the device agent; status, drift, batch scoring."),
    "bench": ("edgefleet.bench:bench", "Run benchmarks (ratios against raw baselines)."),
    "hub": ("cloud_hub.cli:hub", "Run the hub: MQTT ingestion, receipts; add bundles."),
    "fleet": ("cloud_hub.cli_fleet:fleet", "Fleet drift, device registry and tags (hub)."),
    "demo": ("edgefleet.demo:demo", "Run the end-to-end demo."),
}

_ERROR_BASES = (
    ("compiler.errors", "CompileError"),
    ("edge_agent.errors", "AgentError"),
    ("cloud_hub.errors", "CloudHubError"),
    ("fleet_protocol.errors", "ProtocolError"),
)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise click.ClickException(
                f"`edgefleet {cmd_name}` needs a package that is not installed ({err.name}); "
                "install the matching extra, e.g. pip install 'edgefleet[compiler]'"
            ) from err
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in sorted(_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="edgefleet")
def cli(verbose: int) -> None:
    """edgefleet: signed ONNX bundles for fleets of offline devices, watched for drift."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _library_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = []
    for module_name, attr in _ERROR_BASES:
        try:
            out.append(getattr(importlib.import_module(module_name), attr))
        except ImportError:
            continue
    return tuple(out)


def main(argv: list[str] | None = None) -> Any:
    errors = _library_errors()
    try:
        return cli.main(args=argv, prog_name="edgefleet", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except errors as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
