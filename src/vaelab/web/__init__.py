"""The latent explorer: `vaelab serve RUN` serves a page to look inside a trained model.

This module only adds the subcommand; FastAPI and uvicorn are imported when `serve` runs, so other
subcommands start as fast as before. The app itself is `vaelab.web.app.create_app`.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from pathlib import Path

from ..errors import VaelabError
from ..flags import device_arg


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `vaelab serve RUN [--host 127.0.0.1] [--port 8000]` to a CLI's subparsers."""
    p = subparsers.add_parser(
        "serve", help="explore a trained model in the browser: latent map, decoder, interpolations, samples",
        description="Start a local web server for a run (or a folder of runs) and print its address.")
    p.add_argument("run", type=Path, metavar="RUN", help="a run directory, or a folder containing runs")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the server has no login)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="cpu", type=device_arg, metavar="{auto,cpu,cuda,cuda:N}",
                   help="where the models run (default cpu)")
    p.set_defaults(func=cmd_serve)
    return p


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, with a one-line error when the address is taken or invalid."""
    if not 0 <= port <= 65535:
        raise VaelabError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)[0]
        # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of such sockets, and
        # without it every keep-alive response waits ~40 ms for a delayed ACK (Nagle's algorithm)
        sock = socket.socket(family, kind, proto)
        try:
            if os.name != "nt":  # restart at once after Ctrl+C (TIME_WAIT); on Windows it would allow port theft
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock
    except OSError as e:
        why = e.strerror or e
        raise VaelabError(f"cannot listen on {host}:{port} ({why}); pick another --port or --host") from None


def url(sock: socket.socket) -> str:
    """The http:// address a listening socket serves."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def cmd_serve(args: argparse.Namespace) -> int:
    """Bind, load the run(s), print the address and serve until interrupted."""
    try:
        import uvicorn

        from .app import LOOPBACK_HOSTS, create_app
    except ImportError as e:
        raise VaelabError(f"vaelab serve needs fastapi and uvicorn ({e}); pip install fastapi uvicorn") from None

    loopback = is_loopback(args.host)
    sock = bind(args.host, args.port)  # first: a taken port fails before seconds of loading
    try:
        # the address served is a name for this machine too (--host 127.0.0.2 refused every request)
        hosts = [*LOOPBACK_HOSTS, args.host] if loopback else None
        app = create_app(args.run, device=args.device, allowed_hosts=hosts)
    except BaseException:
        sock.close()
        raise
    names = app.state.catalog.names
    what = f"run {names[0]}" if len(names) == 1 else f"{len(names)} runs under {args.run}"
    print(f"vaelab: serving {what} at {url(sock)} (Ctrl+C to stop)", flush=True)
    if not loopback:
        print(f"vaelab: warning: {args.host} may be reachable from other machines, and the explorer has no login",
              flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it handled; the shutdown was clean
        pass
    finally:
        sock.close()
    print("vaelab: server stopped", flush=True)
    return 0
