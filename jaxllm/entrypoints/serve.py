"""`jaxllm serve`: one process, one event loop serving gRPC and OpenAI HTTP over one AsyncEngine.

Lifecycle: SIGTERM/SIGINT → health NOT_SERVING, new requests refused (UNAVAILABLE / 503), in-flight
requests run until ``--shutdown-timeout``, the rest end with finish reason "abort", exit 0. If the
engine loop fails, every open stream ends with an error, health goes NOT_SERVING and the process
exits 1.

    python -m jaxllm.entrypoints.serve --model DIR --grpc-port 50051 --http-port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger("jaxllm.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    grpc_port: int | None = 50051     # None: no gRPC server; 0: any free port
    http_port: int | None = 8000      # None: no HTTP server; 0: any free port
    api_key: str | None = None
    max_queued_requests: int | None = None
    shutdown_timeout: float = 30.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    served_model_name: str | None = None
    log_interval_s: float = 5.0

    def __post_init__(self):
        for name in ("grpc_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name}: must be in [0, 65535], got {port}")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests: must be >= 1, got {self.max_queued_requests}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout: must be >= 0, got {self.shutdown_timeout}")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile: --ssl-certfile and --ssl-keyfile must be given together")
        if self.grpc_port is None and self.http_port is None:
            raise ValueError("grpc_port: at least one of the gRPC and HTTP servers must be enabled")


def _uvicorn_server(app, opts: ServeOptions):
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the serve loop owns SIGTERM/SIGINT (drain first)
            yield

    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5,
                            access_log=False)
    return _Server(config)


async def serve_engine(engine: Any, opts: ServeOptions, stop: asyncio.Event,
                       ready: Callable[[dict[str, int]], None] | None = None) -> int:
    """Serve ``engine`` until ``stop`` is set (then drain) or the engine fails.

    Returns:
        The process exit code: 0 after a clean drain, 1 after an engine failure.
    """
    from jaxllm.engine.async_engine import AsyncEngine
    from jaxllm.entrypoints.metrics import ServerMetrics
    from jaxllm.entrypoints.openai_server import build_app

    model_name = opts.served_model_name or str(engine.model_info.get("model", "model"))
    metrics = ServerMetrics(model_name)
    aengine = AsyncEngine(engine, max_queued_requests=opts.max_queued_requests, observer=metrics)
    aengine.start()
    grpc_server = http_server = http_task = None
    ports: dict[str, int] = {}
    dead = asyncio.Event()

    def on_dead(error: Exception) -> None:
        logger.error("engine failed, shutting down: %s", error)
        dead.set()
        stop.set()

    aengine.add_dead_callback(on_dead)
    log_task = asyncio.create_task(metrics.log_periodically(opts.log_interval_s))
    try:
        if opts.grpc_port is not None:
            # Imported here: an HTTP-only server (--grpc-port -1) needs none of grpcio's extras.
            from jaxllm.entrypoints.grpc_server import GrpcServer
            grpc_server = GrpcServer(aengine, host=opts.host, port=opts.grpc_port, api_key=opts.api_key,
                                     ssl_certfile=opts.ssl_certfile, ssl_keyfile=opts.ssl_keyfile)
            ports["grpc"] = await grpc_server.start()
        if opts.http_port is not None:
            sock = socket.socket(socket.AF_INET6 if ":" in opts.host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((opts.host, opts.http_port))
            ports["http"] = sock.getsockname()[1]
            http_server = _uvicorn_server(build_app(aengine, metrics, api_key=opts.api_key,
                                                    served_model_name=opts.served_model_name), opts)
            http_task = asyncio.create_task(http_server.serve(sockets=[sock]))
            while not http_server.started:
                if http_task.done():
                    http_task.result()
                    raise RuntimeError("HTTP server exited during start-up")
                await asyncio.sleep(0.01)
        logger.info("serving %s: %s", model_name,
                    ", ".join(f"{k} on {opts.host}:{v}" for k, v in ports.items()))
        if ready is not None:
            ready(ports)
        await stop.wait()
        # Shutdown: stop advertising, refuse new work, drain in-flight requests.
        if grpc_server is not None:
            await grpc_server.set_serving(False)
        if not dead.is_set():
            logger.info("draining (up to %.0fs, %d open requests)", opts.shutdown_timeout,
                        aengine.num_open_streams)
            aborted = await aengine.drain(opts.shutdown_timeout)
            if aborted:
                logger.warning("aborted %d requests still running after %.0fs", aborted, opts.shutdown_timeout)
        return 1 if dead.is_set() else 0
    finally:
        log_task.cancel()
        if http_server is not None:
            http_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, timeout=10)
        if grpc_server is not None:
            await grpc_server.stop(1.0)
        await aengine.shutdown()


class ServerThread:
    """Runs :func:`serve_engine` on a background thread with its own event loop (tests, tools)."""

    def __init__(self, engine: Any, opts: ServeOptions):
        self.engine, self.opts = engine, opts
        self.ports: dict[str, int] = {}
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="jaxllm-serve", daemon=True)

    @property
    def grpc_target(self) -> str:
        return f"{self.opts.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.opts.host}:{self.ports['http']}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout) or self.error is not None:
            raise RuntimeError(f"server did not start: {self.error!r}")
        return self

    def _main(self) -> None:
        async def run():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(ports):
                self.ports = ports
                self._ready.set()

            return await serve_engine(self.engine, self.opts, self._stop, ready)

        try:
            self.exit_code = asyncio.run(run())
        except BaseException as e:  # start-up failure
            self.error = e
            self.exit_code = 2
        finally:
            self._ready.set()

    def request_stop(self) -> None:
        """Like SIGTERM: begin the drain (returns at once)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)

    def wait(self, timeout: float | None = None) -> int | None:
        self._thread.join(timeout)
        return self.exit_code

    def stop(self, timeout: float = 60.0) -> int | None:
        self.request_stop()
        return self.wait(timeout)


# -------------------------------------------------------------------- CLI
def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (both servers)")
    g.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (-1 disables the gRPC server)")
    g.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP port (-1 disables the HTTP server)")
    g.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on gRPC and /v1/* (default: $JAXLLM_API_KEY)")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="refuse new requests (429 / RESOURCE_EXHAUSTED) while this many wait for a first token")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM before they are aborted")
    g.add_argument("--ssl-certfile", default=None, help="PEM certificate chain for gRPC TLS")
    g.add_argument("--ssl-keyfile", default=None, help="PEM private key for gRPC TLS")
    g.add_argument("--served-model-name", default=None, help="model name in the OpenAI API (default: --model)")
    g.add_argument("--log-interval", type=float, default=5.0, help="seconds between throughput log lines")
    g.add_argument("--profile", default=None, metavar="DIR",
                   help="write a JAX profiler trace (Perfetto / TensorBoard) from start-up until shutdown")


def add_serve_args(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the ``jaxllm`` CLI's subparsers."""
    from jaxllm.entrypoints.cli import add_engine_args

    p = subparsers.add_parser("serve", help="serve a model over gRPC and OpenAI-compatible HTTP")
    add_engine_args(p, model_required=False)
    add_serve_flags(p)
    p.set_defaults(func=run_serve, _serve_parser=p)
    return p


def _non_default_settings(args: argparse.Namespace, parser: argparse.ArgumentParser | None) -> dict[str, Any]:
    shown = {}
    for key, value in sorted(vars(args).items()):
        if key.startswith("_") or key in ("func", "command", "log_level"):
            continue
        if parser is not None and parser.get_default(key) == value:
            continue
        shown[key] = "***" if key == "api_key" and value else value
    return shown


def options_from_args(args: argparse.Namespace) -> ServeOptions:
    def port(v):
        return None if v is not None and v < 0 else v

    return ServeOptions(host=args.host, grpc_port=port(args.grpc_port), http_port=port(args.http_port),
                        api_key=args.api_key, max_queued_requests=args.max_queued_requests,
                        shutdown_timeout=args.shutdown_timeout, ssl_certfile=args.ssl_certfile,
                        ssl_keyfile=args.ssl_keyfile, served_model_name=args.served_model_name,
                        log_interval_s=args.log_interval)


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``jaxllm serve``: build the engine, serve, drain on SIGTERM, return the exit code."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.llm_engine import LLMEngine
    from jaxllm.entrypoints.cli import engine_kwargs

    logging.getLogger("jaxllm").setLevel(logging.INFO)
    opts = options_from_args(args)  # validate before the (slow) engine start
    logger.info("non-default settings: %s", _non_default_settings(args, getattr(args, "_serve_parser", None)))
    engine = LLMEngine(EngineConfig.create(args.model, **engine_kwargs(args)))

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(ports):
            # One machine-readable line for supervisors and tests.
            print("jaxllm serve ready: " + " ".join(f"{k}={v}" for k, v in ports.items()), flush=True)

        return await serve_engine(engine, opts, stop, ready)

    if getattr(args, "profile", None):
        import jax
        jax.profiler.start_trace(args.profile)
        try:
            return asyncio.run(main())
        finally:
            jax.profiler.stop_trace()
            logger.info("profiler trace written to %s", args.profile)
    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    from jaxllm.entrypoints.cli import add_engine_args

    parser = argparse.ArgumentParser(prog="python -m jaxllm.entrypoints.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="WARNING")
    add_engine_args(parser, model_required=True)
    add_serve_flags(parser)
    args = parser.parse_args(argv)
    args._serve_parser = parser
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxllm serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
