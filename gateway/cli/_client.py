"""The connection options every command that talks to a running gateway shares.

    gateway model list --as admin                       # demo identity, demo config
    gateway policy show --config prod.toml              # [client] section of the file
    gateway call demo-mlp --target gw:8443 --ca ca.pem --cert me.pem --key me.key ...

Resolution, flag first: ``--target`` / ``$GATEWAY_TARGET`` / ``[client] target`` /
``[server] listen``;
``--ca`` / ``[client] ca`` / ``[tls] ca``; ``--cert``+``--key`` / an explicit ``--as NAME``
(the demo identity ``<dir of the CA>/clients/NAME.pem|.key``) / ``[client] cert``+``key`` /
the verb's default demo identity (admin for changes, auditor for reads). Relative paths in
the config file resolve against the file's directory; without ``--config``, the built-in
demo defaults resolve against the working directory (so run from the repository, or pass
``--config``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    # Imported by the functions that connect: the verbs that only declare these options
    # (and `gateway --help`) do not load grpc.
    import grpc
    from google.protobuf.message import Message


def add_client_arguments(parser: argparse.ArgumentParser, *, default_as: str | None,
                         config: bool = True) -> None:
    """Add --config (unless the parser has one), --target, --ca, --cert, --key and --as."""
    group = parser.add_argument_group("connection (see `gateway call --help` epilog)")
    if config:
        group.add_argument("--config", type=Path, metavar="FILE",
                           help="gateway TOML config; its [client] section (or [server] "
                           "listen and [tls] ca) says where and how to connect (default: the "
                           "demo defaults, relative to the working directory)")
    group.add_argument("--target", help="host:port of the gateway (overrides $GATEWAY_TARGET "
                       "and the config)")
    group.add_argument("--ca", type=Path, help="CA bundle the gateway's certificate must "
                       "chain to (overrides the config)")
    group.add_argument("--cert", type=Path, help="client certificate (PEM)")
    group.add_argument("--key", type=Path, help="client private key (PEM)")
    group.add_argument("--as", dest="identity", default=None, metavar="NAME",
                       help="demo identity: use <CA dir>/clients/NAME.pem and NAME.key (default:"
                       f" [client] cert and key if configured, else "
                       f"{default_as or 'none: give --cert and --key'})")
    parser.set_defaults(default_identity=default_as)


def client_verb(verbs: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                helptext: str, func: Callable[[argparse.Namespace], int | None], *,
                default_as: str | None) -> argparse.ArgumentParser:
    """A verb that talks to a running gateway: connection options, --json, its handler."""
    p = verbs.add_parser(name, help=helptext)
    add_client_arguments(p, default_as=default_as)
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(func=func)
    return p


def connect(args: argparse.Namespace) -> tuple[grpc.Channel, str]:
    """The mTLS channel the arguments describe, and a label of who connects where."""
    from gateway.client import ClientSettings, channel
    from gateway.config import ServerSettings, load_section
    from gateway.identity import TlsSettings

    # The three sections a client reads, each on its own: a whole config would import
    # every domain package (ONNX Runtime among them) to connect.
    client = load_section(args.config, "client", ClientSettings)
    listen = load_section(args.config, "server", ServerSettings).listen
    target = (args.target or os.environ.get("GATEWAY_TARGET") or client.target
              or _local(listen))
    ca = args.ca or client.ca or load_section(args.config, "tls", TlsSettings).ca
    # Precedence: --cert/--key, an explicit --as, [client] cert/key, the verb's default --as.
    cert, key = args.cert, args.key
    identity = None
    if cert is None and key is None:
        if args.identity is None and client.cert is not None:
            cert, key = client.cert, client.key
        else:
            identity = args.identity or args.default_identity
    if (cert is None) != (key is None) and identity is None:
        raise ConfigError("give both a client certificate and its key (--cert and --key, or "
                          "[client] cert and key)")
    if identity is None and cert is None:
        raise ConfigError("no client identity: give --as NAME (a demo identity), "
                          "--cert and --key, or [client] cert and key in --config")
    if identity is not None:
        cert, key = _demo_identity(identity, Path(ca), args.config)
    who = identity or str(cert)
    return channel(target, Path(ca), Path(cert), Path(key)), f"{who} -> {target}"


def _demo_identity(name: str, ca: Path, config: Path | None) -> tuple[Path, Path]:
    """The certificate and key of demo identity ``name``, beside the CA; ConfigError saying
    how paths resolved if they are not there."""
    clients = ca.parent / "clients"
    cert, key = clients / f"{name}.pem", clients / f"{name}.key"
    if not cert.exists():
        known = sorted(p.stem for p in clients.glob("*.pem")) if clients.is_dir() else []
        where = ("without --config, paths resolve against the working directory: run from the "
                 "repository after `make demo`, or pass --config FILE" if config is None else
                 f"paths in {config} resolve against its directory")
        raise ConfigError(f"no certificate for identity {name!r} at {cert}"
                          + (f" (known: {', '.join(known)})" if known else "") + f"; {where}")
    return cert, key


def call_once(args: argparse.Namespace, stub_class: Callable[[grpc.Channel], object],
              method: str, request: Message, *, timeout: float) -> Any:
    """Connect as ``args`` say, make one unary call, close the channel; the reply.

    The reply's message type is the one ``method`` (named as a string) returns: Any, since
    no static type follows from a method name.
    """
    channel, _ = connect(args)
    with channel:
        return getattr(stub_class(channel), method)(request, timeout=timeout)


def _local(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    wildcard = host in ("0.0.0.0", "[::]", "")  # noqa: S104 - connect, not bind
    return f"127.0.0.1:{port}" if wildcard else listen


class RpcFailed(GatewayError):
    """A call the gateway refused or could not answer; exit code 1 for a denial, else 2."""

    def __init__(self, err: grpc.RpcError) -> None:
        import grpc

        code = err.code() if hasattr(err, "code") else None
        details = err.details() if hasattr(err, "details") else str(err)
        name = code.name if code is not None else "UNKNOWN"
        hint = ""
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = " (is the gateway running there, and does it trust this CA?)"
        super().__init__(f"{name}: {details}{hint}")
        self.code = code
        from gateway.client import Receipt

        metadata = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        # The grpc stub types metadata items as a class with key and value; gRPC gives
        # (key, value) named tuples, which is what from_metadata reads.
        self.receipt = Receipt.from_metadata(metadata)  # type: ignore[arg-type]

    @property
    def exit_code(self) -> int:
        import grpc

        return 1 if self.code == grpc.StatusCode.PERMISSION_DENIED else 2

    def diagnostics(self) -> str:
        if self.receipt is None:
            return str(self)
        return (f"{self} (audit receipt: index {self.receipt.index}, leaf "
                f"{self.receipt.leaf_hash.hex()})")
