"""The ``backdial`` console script: one entry point, one subcommand per role.

Subcommands import their component lazily, so ``backdial serve`` never loads
the acceptor and a component's import cost is paid only by its own process.
This dispatcher is the one place allowed to name every component.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("backdial.up:main", "local all-in-one: acceptor + sidecar + demo service"),
    "acceptor": ("backdial.acceptor.main:main", "own sessions, grant leases to sidecars"),
    "sidecar": ("backdial.sidecar.main:main", "HTTP/1.1 proxy over leased sessions"),
    "serve": ("backdial.sdk.main:serve_main", "run an ASGI app over dialed sessions"),
    "bridge": ("backdial.sdk.main:bridge_main", "relay sessions to an unmodified HTTP app"),
    "route": ("backdial.routecli:main", "add, delete or list routes on a running acceptor"),
    "operator": ("backdial.operator.main:main", "reconcile SessionSlice objects (kopf)"),
    "crd": ("backdial.operator.crd:main", "print the CRDs generated from the models"),
}


def _version() -> str:
    try:
        return version("backdial")
    except PackageNotFoundError:
        return "0+unknown"


def usage() -> str:
    lines = ["usage: backdial <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'backdial <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"backdial {_version()}")
        return 0
    entry = COMMANDS.get(args[0])
    if entry is None:
        print(f"backdial: error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = entry[0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("backdial"):
            print(f"backdial: error: '{args[0]}' is not available in this build", file=sys.stderr)
            return 1
        raise
    result: int = getattr(module, func_name)(args[1:])
    return result


if __name__ == "__main__":
    sys.exit(main())
