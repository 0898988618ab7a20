"""GenEval reward server speaking the upstream protocol (yifan123/reward-server), so upstream clients work.

    python -m shared_rewards.geneval.serve --port 18085 --device cuda:0
    python -m shared_rewards.geneval.serve --workers 4 --device cuda        # cuda:0..3, one model each

POST `/`: body `pickle.dumps({"images": [JPEG bytes], "meta_datas": [dict], "only_strict": bool})`, answer
`pickle.dumps({"scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards"})` (spec B.9).
GET `/health`: 200 with JSON (device, backend, ready, pid, worker).

Unlike upstream, the request is unpickled with no globals allowed (a crafted pickle cannot run code), the body
size is capped (413), images must be JPEG and their decoded pixels are capped per image and per request from
the JPEG headers, before any decode (413), metadata is checked, and every failure is a 4xx/500 with a one-line
plain-text reason while the server keeps serving. It binds 127.0.0.1 unless --host says otherwise: pickle
over HTTP is still a protocol to keep off shared networks.

Several workers share one listening socket, each its own process and model, like upstream's gunicorn sync
workers: a worker handles one connection at a time and closes it after one request, so an idle worker takes
the next request instead of a busy one.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import pickle
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

import numpy as np

from .protocol import (
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_PIXELS,
    RESPONSE_KEYS,
    PixelLimitError,
    ProtocolError,
    check_response,
    decode_jpegs,
    parse_request,
)

logger = logging.getLogger("shared_rewards.geneval.serve")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18085  # upstream gunicorn.conf.py
DEFAULT_MAX_BODY_MB = 256.0  # 64 JPEGs of 1024 px are ~10 MB; the cap only stops runaway or hostile bodies
WORKER_HEADER = "X-GenEval-Worker-Pid"

# images: [H, W, 3] uint8 RGB arrays; metadatas: validated GenEval metadata -> the upstream response dict
Evaluator = Callable[[list[np.ndarray], list[dict], bool], dict]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise OSError(f"geneval server: cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _validate_metadatas(metadatas: list[Any]) -> list[dict]:
    from .metadata import validate_metadata

    out = []
    for i, md in enumerate(metadatas):
        try:
            out.append(validate_metadata(md, i))
        except ValueError as exc:  # the message names metadata[i] and the key
            raise ProtocolError(str(exc)) from None
    return out


def plain_response(result: Any, batch: int) -> dict:
    """The evaluator's dict with plain lists of Python floats: numpy arrays or scalars would pickle as numpy
    globals, which careful clients (ours) refuse to unpickle. Checked for every key and length."""
    if not isinstance(result, dict) or any(k not in result for k in RESPONSE_KEYS):
        check_response(result, batch)  # raises, naming what is missing
    try:
        out = {key: [float(v) for v in result[key]] for key in RESPONSE_KEYS[:3]}
        for key in RESPONSE_KEYS[3:]:
            out[key] = {str(tag): [float(v) for v in values] for tag, values in dict(result[key]).items()}
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"evaluator answer is not lists of numbers ({exc})") from None
    return check_response(out, batch)


class GenEvalServer(ThreadingHTTPServer):
    """HTTP server around one evaluator. Use `serve_forever()` (e.g. in a thread), then `shutdown()` and
    `server_close()`. `url` is where clients reach it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, evaluator: Evaluator, sock: socket.socket, *, max_body_bytes: int, info: dict,
                 one_at_a_time: bool, show_traceback: bool, read_timeout: float, max_image_pixels: int,
                 max_request_pixels: int):
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        # Workers sharing the socket all wake for one connection; the losers must go back to select(), not
        # sit in a blocking accept() that neither shutdown() nor an idle-worker hand-off can get past.
        sock.setblocking(False)
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.evaluator = evaluator
        self.max_body_bytes = max_body_bytes
        self.info = info
        self.one_at_a_time = one_at_a_time
        self.show_traceback = show_traceback
        self.read_timeout = read_timeout
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.lock = threading.Lock()  # one model per process: evaluator calls run one at a time
        self.requests_served = 0

    @property
    def url(self) -> str:
        return socket_url(self.socket)

    def health(self) -> dict:
        return {"status": "ok", "ready": True, "pid": os.getpid(), "requests_served": self.requests_served,
                "max_body_bytes": self.max_body_bytes, "max_image_pixels": self.max_image_pixels,
                "max_request_pixels": self.max_request_pixels, **self.info}

    def process_request(self, request, client_address):
        if self.one_at_a_time:  # gunicorn-sync: not accepting while busy lets an idle worker take the next one
            return socketserver.BaseServer.process_request(self, request, client_address)
        return super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        logger.warning("connection from %s ended with %s: %s", client_address[0], type(exc).__name__, exc)


def create_server(evaluator: Evaluator, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                  sock: socket.socket | None = None, max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
                  device: str = "?", backend: str = "?", worker: int = 0, workers: int = 1,
                  one_at_a_time: bool = False, show_traceback: bool = False, read_timeout: float = 60.0,
                  max_image_pixels: int = MAX_IMAGE_PIXELS, max_request_pixels: int = MAX_REQUEST_PIXELS
                  ) -> GenEvalServer:
    """A server around any `evaluator(images, metadatas, only_strict) -> dict`, bound to host:port (or to
    `sock`, a listening socket shared by pre-forked workers). `device`/`backend` are reported by /health."""
    if not callable(evaluator):
        raise TypeError(f"geneval server: evaluator must be callable, got {type(evaluator).__name__}")
    if max_body_bytes <= 0:
        raise ValueError(f"geneval server: max_body_bytes must be positive, got {max_body_bytes}")
    for key, value in (("max_image_pixels", max_image_pixels), ("max_request_pixels", max_request_pixels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"geneval server: {key} must be a positive int, got {value!r}")
    if sock is None:
        sock = bind_socket(host, port)
    host = sock.getsockname()[0]
    if not is_loopback(host):
        logger.warning("listening on %s, beyond loopback: the protocol is pickle, so anyone who reaches this port "
                       "talks to this process; keep it on a private network or use an SSH tunnel", host)
    info = {"device": str(device), "backend": str(backend), "worker": worker, "workers": workers}
    return GenEvalServer(evaluator, sock, max_body_bytes=max_body_bytes, info=info, one_at_a_time=one_at_a_time,
                         show_traceback=show_traceback, read_timeout=read_timeout, max_image_pixels=max_image_pixels,
                         max_request_pixels=max_request_pixels)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "shared-rewards-geneval/1"
    server: GenEvalServer

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # a stalled client cannot hold a thread (or a worker) forever
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        if self.server.one_at_a_time:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(WORKER_HEADER, str(os.getpid()))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, status: int, reason: str, *, body_unread: bool = False) -> None:
        if body_unread:  # what is left of the body would be read as the next request
            self.close_connection = True
        reason = " ".join(reason.split())[:1000]
        logger.info("%s %s -> %d %s", self.command, self.path, status, reason)
        self._send(status, (reason + "\n").encode(), "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            return self._fail(404, f"no such path {self.path!r}: POST / scores images, GET /health reports status")
        self._send(200, json.dumps(self.server.health()).encode(), "application/json")

    def _read_body(self) -> bytes | None:
        if self.path.split("?")[0] != "/":
            self._fail(404, f"no such path {self.path!r}: POST the pickled request to /", body_unread=True)
            return None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._fail(411, "chunked bodies are not accepted; send a Content-Length", body_unread=True)
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self._fail(411, "Content-Length is required", body_unread=True)
            return None
        try:
            length = int(length_text)
            if length < 0:
                raise ValueError
        except ValueError:
            self._fail(400, f"bad Content-Length {length_text!r}", body_unread=True)
            return None
        if length > self.server.max_body_bytes:
            self._fail(413, f"body of {length} bytes is over the limit of {self.server.max_body_bytes} bytes "
                            f"(server option --max-body-mb); send fewer or smaller images per request",
                       body_unread=True)
            return None
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True  # the client went away mid-body; nobody to answer
            logger.info("POST / from %s: body ended after %d of %d bytes", self.address_string(), len(body), length)
            return None
        return body

    def do_POST(self) -> None:
        start = time.perf_counter()
        body = self._read_body()
        if body is None:
            return
        try:
            images, metadatas, only_strict = parse_request(body)
            metadatas = _validate_metadatas(metadatas)
            arrays = decode_jpegs(images, self.server.max_image_pixels, self.server.max_request_pixels)
        except PixelLimitError as exc:
            return self._fail(413, str(exc))
        except ProtocolError as exc:
            return self._fail(400, str(exc))
        try:
            with self.server.lock:
                result = self.server.evaluator(arrays, metadatas, only_strict)
                self.server.requests_served += 1
            response = plain_response(result, len(arrays))
        except Exception as exc:
            logger.error("evaluator failed on %d images:\n%s", len(arrays), traceback.format_exc())
            reason = f"evaluator failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.server.show_traceback:
                body = (reason + "\n" + traceback.format_exc()).encode()
                return self._send(500, body, "text/plain; charset=utf-8")
            return self._fail(500, reason)
        self._send(200, pickle.dumps(response), "application/octet-stream")
        logger.info("POST / %d images only_strict=%s -> 200 in %.2f s", len(arrays), only_strict,
                    time.perf_counter() - start)


# --- command line: one process, or a master that pre-forks workers ---------------------------------------

def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs for load_evaluator; values are JSON when they parse (0.5, true, "x"), else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option must look like key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def worker_devices(device: str | None, workers: int | None) -> list[str]:
    """One device per worker. A list ("cuda:0,cuda:2") is used as given; one CUDA device with N workers
    means N consecutive GPUs from it ("cuda:1", 2 workers -> cuda:1, cuda:2); "cpu" is shared."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = [d.strip() for d in device.split(",") if d.strip()]
    if not names:
        raise ValueError(f"--device is empty: {device!r}")
    if len(names) > 1:
        if workers is not None and workers != len(names):
            raise ValueError(f"--workers {workers} does not match the {len(names)} devices in --device {device!r}")
        return names
    workers = 1 if workers is None else workers
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    name = names[0]
    if name.startswith("cuda"):
        first = int(name.partition(":")[2] or 0)
        return [f"cuda:{first + i}" for i in range(workers)]
    if workers > 1 and name != "cpu":
        raise ValueError(f"--workers {workers} needs a CUDA device or a device list, got --device {name!r}")
    return [name] * workers


def _child_env(device: str) -> tuple[dict[str, str], str]:
    """Each worker sees only its own GPU, so nothing can allocate on another worker's (upstream's post-fork
    hook does the same). Returns (environment, the device name inside the worker)."""
    env = dict(os.environ)
    if not device.startswith("cuda"):
        return env, device
    index = int(device.partition(":")[2] or 0)
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and index >= len(visible):
        raise ValueError(f"--device {device} is beyond CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return env, "cuda:0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shared_rewards.geneval.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=DEFAULT_HOST, help="bind address (default loopback; see the pickle warning)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (logged at start)")
    p.add_argument("--device", default=None, help="cuda:0, cuda (with --workers: consecutive GPUs), a list "
                                                  "cuda:0,cuda:3, or cpu; default cuda if available")
    p.add_argument("--workers", type=int, default=None, help="worker processes, one model each (default: one, "
                                                             "or one per --device entry)")
    p.add_argument("--backend", default="transformers", help="detector backend: transformers or mmdet")
    p.add_argument("--detector", default=None, help="detector weights: hub id or local path (backend default)")
    p.add_argument("--clip", default=None, help="CLIP colour classifier: hub id or local path (backend default)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="scoring/evaluator option passed to load_evaluator, repeatable (e.g. threshold=0.3)")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, help="request body limit (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help="decoded pixels allowed in one image, W x H read from its JPEG header before any decode "
                        "(413 above; default %(default)s = 2 x a 1024 x 1024 image)")
    p.add_argument("--max-request-pixels", type=int, default=MAX_REQUEST_PIXELS,
                   help="decoded pixels allowed in one request's images together (413 above; default %(default)s "
                        "= 2 x a chunk of 64 images of 1024 x 1024)")
    p.add_argument("--read-timeout", type=float, default=60.0, help="seconds a client may stall while sending")
    p.add_argument("--traceback", action="store_true", help="put the full traceback in 500 bodies (upstream did)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--device-label", default=None, help=argparse.SUPPRESS)
    return p


def _load(args: argparse.Namespace, device: str) -> Evaluator:
    from .evaluator import load_evaluator

    sources = {k: v for k, v in (("detector", args.detector), ("clip", args.clip)) if v is not None}
    return load_evaluator(device=device, backend=args.backend, **sources, **parse_options(args.option))


def _exit_with_parent() -> None:
    """A worker whose master died (even by SIGKILL) must not keep the port and a GPU."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                logger.error("master process %d is gone; worker exiting", parent)
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _serve(args: argparse.Namespace, sock: socket.socket, device: str, label: str, workers: int) -> None:
    start = time.perf_counter()
    try:
        evaluator = _load(args, device)
    except Exception as exc:  # bad option, missing weights or backend: one line, the traceback on request
        logger.debug("evaluator load failed", exc_info=True)
        text = str(exc).splitlines()[0] if str(exc) else ""
        logger.error("worker %d cannot load the evaluator on %s: %s: %s (--log-level DEBUG shows the traceback)",
                     args.worker_index, label, type(exc).__name__, text)
        raise SystemExit(1) from None
    server = create_server(evaluator, sock=sock, max_body_bytes=int(args.max_body_mb * 2**20), device=label,
                           backend=args.backend, worker=args.worker_index, workers=workers,
                           one_at_a_time=workers > 1, show_traceback=args.traceback,
                           read_timeout=args.read_timeout, max_image_pixels=args.max_image_pixels,
                           max_request_pixels=args.max_request_pixels)
    logger.info("worker %d (pid %d) ready on %s, device %s, backend %s, loaded in %.1f s", args.worker_index,
                os.getpid(), server.url, label, args.backend, time.perf_counter() - start)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()


def _supervise(args: argparse.Namespace, sock: socket.socket, devices: list[str]) -> int:
    """Starts one worker process per device on the shared socket; if one dies, stops them all (a silently
    shrinking pool would only show up as slower training)."""
    procs = []
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i, device in enumerate(devices):
        env, inner = _child_env(device)
        cmd = [sys.executable, "-m", "shared_rewards.geneval.serve", "--worker-fd", str(sock.fileno()),
               "--worker-index", str(i), "--workers", str(len(devices)), "--device", inner, "--device-label", device,
               "--backend", args.backend, "--max-body-mb", str(args.max_body_mb), "--max-image-pixels",
               str(args.max_image_pixels), "--max-request-pixels", str(args.max_request_pixels),
               "--read-timeout", str(args.read_timeout), "--log-level", args.log_level]
        cmd += [a for k, v in (("--detector", args.detector), ("--clip", args.clip)) if v is not None for a in (k, v)]
        cmd += [a for option in args.option for a in ("--option", option)]
        cmd += ["--traceback"] if args.traceback else []
        procs.append(subprocess.Popen(cmd, env=env, pass_fds=(sock.fileno(),)))
    logger.info("master (pid %d) started %d workers on %s:%d: %s", os.getpid(), len(procs),
                *sock.getsockname()[:2], ", ".join(f"{d} (pid {p.pid})" for d, p in zip(devices, procs)))
    code = 0
    while not stopping:
        dead = [(i, p) for i, p in enumerate(procs) if p.poll() is not None]
        if dead:
            i, p = dead[0]
            logger.error("worker %d (pid %d, %s) exited with code %s; stopping the server", i, p.pid, devices[i],
                         p.returncode)
            code = 1
            break
        time.sleep(0.2)
    if stopping:
        logger.info("master (pid %d) stopping its workers", os.getpid())
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10.0
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    sock.close()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s geneval-serve[%(process)d] %(message)s")
    if args.worker_fd is not None:  # a worker started by the master below
        _exit_with_parent()
        sock = socket.socket(fileno=args.worker_fd)
        _serve(args, sock, args.device, args.device_label or args.device, args.workers or 1)
        return 0
    try:
        devices = worker_devices(args.device, args.workers)
        if args.max_body_mb <= 0:
            raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
        for flag, value in (("--max-image-pixels", args.max_image_pixels),
                            ("--max-request-pixels", args.max_request_pixels)):
            if value <= 0:
                raise ValueError(f"{flag} must be a positive number of pixels, got {value}")
        parse_options(args.option)
        sock = bind_socket(args.host, args.port)
    except (ValueError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    # start_server() reads this line to learn the port when it asked for port 0
    logger.info("listening on %s", socket_url(sock))
    if len(devices) == 1:
        _serve(args, sock, devices[0], devices[0], 1)
        return 0
    return _supervise(args, sock, devices)


if __name__ == "__main__":
    sys.exit(main())
