"""Executing probe and lifecycle handlers against a running container.

``httpGet`` and ``tcpSocket`` go to the pod IP (or the handler's ``host``); ``exec`` runs
the command inside the container's mount and UTS namespaces (``nsenter``) with the
container's environment; ``sleep`` just waits. Every handler is bounded by a timeout and
reports success as a bool (HTTP: status 200 to 399, as the kubelet).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping, Sequence

from .probes import Action, Handler

PROBE_USER_AGENT = "kube-probe/1.36"


async def http_get(handler: Handler, host: str, limit: float) -> bool:
    """One HTTP/1.1 GET; success is a 2xx or 3xx status."""
    context: ssl.SSLContext | None = None
    if handler.scheme == "HTTPS":  # the kubelet does not verify probe certificates either
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    headers = {"Host": f"{host}:{handler.port}", "User-Agent": PROBE_USER_AGENT, "Accept": "*/*"}
    headers.update(dict(handler.headers))
    headers["Connection"] = "close"
    request = f"GET {handler.path} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, handler.port, ssl=context), limit
    )
    try:
        writer.write(request.encode("latin-1") + b"\r\n")
        status_line = await asyncio.wait_for(reader.readline(), limit)
        parts = status_line.split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def tcp_connect(handler: Handler, host: str, limit: float) -> bool:
    """Whether a TCP connection can be opened."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, handler.port), limit)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def run_exec(argv: Sequence[str], env: Mapping[str, str], limit: float) -> bool:
    """Run ``argv``; success is exit status 0 within ``limit`` seconds (then it is killed)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return await asyncio.wait_for(proc.wait(), limit) == 0
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise


async def run_handler(
    handler: Handler,
    *,
    pod_ip: str,
    limit: float,
    exec_argv: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> bool:
    """Execute ``handler``; any error or timeout is a failure. ``exec_argv`` is the exec
    command already wrapped for the container's namespaces (see ``process.py``)."""
    host = handler.host or pod_ip
    try:
        if handler.action is Action.HTTP:
            return await http_get(handler, host, limit)
        if handler.action is Action.TCP:
            return await tcp_connect(handler, host, limit)
        if handler.action is Action.EXEC:
            return await run_exec(exec_argv, env or {}, limit)
        if handler.action is Action.SLEEP:
            await asyncio.sleep(handler.seconds)
            return True
    except (TimeoutError, OSError, ssl.SSLError):
        return False
    return False  # gRPC probes are not supported by the process node
