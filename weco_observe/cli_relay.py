"""CLI for the relay: ``weco observe serve`` and ``weco observe serve keys add|list|revoke``.

Listed in ``cli.OBSERVE_COMMANDS`` as a group: ``serve`` with no subcommand runs the
relay (``relay.serve``); ``keys`` manages who may use it. The web server is
imported only when the relay runs, from the ``server`` extra.
"""

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

DataOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data", help="The relay's folder (its journal and keys). Default: a `relay` folder in the data dir."
    ),
]

serve = typer.Typer(
    help="Run a Weco-compatible relay and team dashboard: boxes sync to it, it forwards upstream.",
    invoke_without_command=True,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
)
keys = typer.Typer(help="Manage the keys the relay accepts.", no_args_is_help=True, pretty_exceptions_enable=False)
serve.add_typer(keys, name="keys")


def _data(data: Path | None) -> Path:
    from .settings import Settings

    return data if data is not None else Settings.load().data_dir / "relay"


@serve.callback()
def serve_command(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0 picks a free one).")] = 8420,
    data: DataOpt = None,
    upstream: Annotated[
        Optional[str],
        typer.Option("--upstream", help="Forward everything to this Weco API (or another relay) base URL."),
    ] = None,
    upstream_key_file: Annotated[
        Optional[Path],
        typer.Option(
            "--upstream-key-file", help="A file holding the upstream key (default: WECO_API_KEY / weco login)."
        ),
    ] = None,
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate: serve HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plain HTTP on a non-loopback address (keys travel in clear).")
    ] = False,
    json_log: Annotated[bool, typer.Option("--json-log", help="Access log as JSON lines, for log collectors.")] = False,
    workers: Annotated[
        int,
        typer.Option("--workers", help="Serving processes on the one port; 2 on two cores takes in ~1.8x the steps."),
    ] = 1,
) -> None:
    """Serve the Weco external-runs API and a dashboard of every run (Ctrl-C or SIGTERM to stop).

    Boxes point WECO_BASE_URL at http(s)://HOST:PORT/v1 with a key from
    `weco observe serve keys add NAME`. With --upstream, everything received is
    forwarded there with retries whenever the route is up.
    """
    if ctx.invoked_subcommand is not None:
        return
    from . import relay
    from .errors import InvalidInput
    from .settings import Settings, check_api_key

    key = None
    if upstream:
        if upstream_key_file is not None:
            try:
                key = check_api_key(upstream_key_file.read_text(encoding="utf-8"), str(upstream_key_file))
            except OSError as exc:
                raise InvalidInput(f"cannot read --upstream-key-file {upstream_key_file}: {exc.strerror}") from None
        else:
            key = Settings.load().api_key
        if not key:
            raise InvalidInput("--upstream needs a key: --upstream-key-file FILE, WECO_API_KEY or `weco login`")

    def ready(url: str) -> None:
        print(f"{url}/v1", flush=True)
        print(f"weco-observe relay: API at {url}/v1, dashboard at {url}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)

    relay.serve(
        host=host,
        port=port,
        data_dir=_data(data),
        upstream=upstream,
        upstream_key=key,
        tls_cert=tls_cert,
        tls_key=tls_key,
        insecure=insecure,
        json_log=json_log,
        workers=workers,
        ready=ready,
    )


@keys.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="Who uses the key: a box or a user, shown in the dashboard.")],
    data: DataOpt = None,
    read_only: Annotated[bool, typer.Option("--read-only", help="Opens the dashboard; cannot log.")] = False,
) -> None:
    """Make a key; it is printed once (only its hash is kept)."""
    from . import relay

    print(relay.keys_add(_data(data), name, read_only=read_only))
    print(f"key {name!r} added{' (read-only)' if read_only else ''}: it is shown only this once", file=sys.stderr)


@keys.command("list")
def keys_list(
    data: DataOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the keys (names, not the keys themselves)."""
    import time

    from . import relay

    rows = relay.keys_list(_data(data))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no keys yet: `weco observe serve keys add NAME`", file=sys.stderr)
    for r in rows:
        state = "revoked" if r["revoked_at"] else "read-only" if r["read_only"] else "active"
        made = time.strftime("%Y-%m-%d", time.gmtime(r["created_at"]))
        print(f"{r['name']}\t{state}\t{made}")


@keys.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")], data: DataOpt = None) -> None:
    """Revoke a key: the relay refuses it (401) from its next request on."""
    from . import relay

    relay.keys_revoke(_data(data), name)
    print(f"key {name!r} revoked", file=sys.stderr)
