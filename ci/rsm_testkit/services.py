"""Stand-in servers for the service-backed rewards, so tests and `--tiny` runs can use `deqa`, `qwenvl`,
`unifiedreward` and `geneval` on a CPU with no network and no GPU.

    python -m rsm_testkit.services deqa|qwenvl|unifiedreward|geneval [--host 127.0.0.1] [--port 0]

THESE ARE NOT THE REAL REWARD MODELS. `deqa`, `qwenvl` and `unifiedreward` are small HTTP servers that speak
each client's protocol exactly (shared_rewards/README.md) and answer a deterministic score computed from
the pixels they receive, so rewards vary with the image and a tiny run has something to learn. With b the
image's mean brightness in [0, 1] (uint8 RGB mean / 255), every stand-in's reward has expectation 0.2 + 0.8 b,
in [0.2, 1] like the real scores (1-5, divided by 5):

    deqa            outputs 0.2 + 0.8 b (the server's DeQA-Score / 5)
    unifiedreward   answers "Final Score: s", s = 1 + 4 b with 4 decimals; the client's reward is s / 5
    qwenvl          answers "<Score>n</Score>", n = floor(1 + 4 b + u), with u in [0, 1) a hash of the pixels:
                    the rubric only allows integers, and this rounding keeps the expected reward affine in b
                    while staying deterministic per image

Prompts, questions, models and API keys are accepted and ignored. `geneval` is not a stand-in for the code:
it is the real GenEval server of shared_rewards (`geneval.serve.create_server` around `load_evaluator`),
run in this process on the tiny random-weight Mask2Former and CLIP of the tiny kit. Random weights are never
confident, so the detection thresholds default to 0 here (`--option threshold=0.3 --option
counting_threshold=0.9` restores GenEval's); at GenEval's thresholds every tiny reward is 0 and a tiny run
would learn nothing. Any other load_evaluator argument can be set the same way (e.g. `--option
detector=<path>` for another tiny detector).

Contract: the process prints exactly one line `listening on http://<host>:<port>` on stdout once it serves
(`--port 0` picks a free port), logs to stderr, answers `GET /health` with 200 and JSON holding
`"service"` and `"stand_in": true`, binds loopback unless --host says otherwise, and exits 0 on SIGTERM or
SIGINT. A bad argument is one line on stderr and exit 2; a port it cannot bind or models it cannot load, one
line and exit 1. From Python, `start(name)` launches one and waits for that line; `url_path(name)` is what
the client's `url` option adds to the printed address (`reward_options.<name>.url`).
"""
from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger("rsm_testkit.services")

SERVICES = ("deqa", "qwenvl", "unifiedreward", "geneval")
# What each client appends to the server's address: the chat clients' URL is the OpenAI base (their defaults
# end in /v1) and they post to <url>/chat/completions; deqa and geneval post to the URL itself.
URL_PATHS = {"deqa": "", "qwenvl": "/v1", "unifiedreward": "/v1", "geneval": ""}
CHAT_PATH = "/v1/chat/completions"
GENEVAL_STAND_IN_OPTIONS = {"threshold": 0.0, "counting_threshold": 0.0}
MAX_BODY_BYTES = 256 * 2**20  # a chunk of 64 JPEGs of 1024 px is ~10 MB; only runaway bodies are refused
READ_TIMEOUT_S = 60.0  # a client that stalls mid-request cannot hold a thread for ever
LISTENING = re.compile(r"^listening on (http://\S+)$", re.MULTILINE)


def url_path(name: str) -> str:
    """The suffix the client's `url` option adds to the stand-in's address: '/v1' for qwenvl and
    unifiedreward, '' for deqa and geneval."""
    if name not in URL_PATHS:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}")
    return URL_PATHS[name]


# --- scoring from pixels ------------------------------------------------------------------------------

def brightness(image: np.ndarray) -> float:
    """Mean of a [H, W, 3] uint8 RGB image, in [0, 1]."""
    return float(np.asarray(image, dtype=np.float64).mean() / 255.0)


def pixel_hash_fraction(image: np.ndarray) -> float:
    """A number in [0, 1) fixed by the image's shape and pixels."""
    digest = hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def deqa_score(image: np.ndarray) -> float:
    return 0.2 + 0.8 * brightness(image)


def unifiedreward_answer(image: np.ndarray) -> str:
    b = brightness(image)
    return f"Stand-in judge (not UnifiedReward): mean brightness {b:.4f}.\nFinal Score: {1.0 + 4.0 * b:.4f}"


def qwenvl_answer(image: np.ndarray) -> str:
    b = brightness(image)
    level = min(5, math.floor(1.0 + 4.0 * b + pixel_hash_fraction(image)))
    return (f"<Thought>\nStand-in judge (not Qwen2.5-VL): mean brightness {b:.4f}, expected level "
            f"{1.0 + 4.0 * b:.3f}.\n</Thought>\n<Score>{level}</Score>")


CHAT_ANSWERS = {"qwenvl": qwenvl_answer, "unifiedreward": unifiedreward_answer}


class RequestError(ValueError):
    """A request the stand-in refuses; `status` is the HTTP code, the message one line."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_data_url(url: Any, max_pixels: int) -> np.ndarray:
    """A base64 data URL of a PNG or JPEG -> [H, W, 3] uint8 RGB, refused (413) above `max_pixels` from the
    header, before decoding."""
    from PIL import Image

    if not isinstance(url, str):
        raise RequestError(f"image_url.url must be a string, got {type(url).__name__}")
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise RequestError("image_url.url must be a base64 data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("image_url.url is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"])
    except Image.DecompressionBombError:
        raise RequestError(f"the image has more than {max_pixels} pixels", 413) from None
    except Exception as exc:  # not an image, or a broken header
        raise RequestError(f"the image is not a decodable PNG or JPEG ({type(exc).__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(f"the image is {width}x{height}, over the stand-in's limit of {max_pixels} pixels", 413)
    try:
        with image:
            return np.array(image.convert("RGB"))  # [H, W, 3] uint8
    except Exception as exc:  # truncated or corrupt pixel data
        raise RequestError(f"the image is not a decodable PNG or JPEG ({type(exc).__name__})") from None


def chat_image(request: Any) -> np.ndarray:
    """The first image of an OpenAI chat-completions request, decoded."""
    from shared_rewards.geneval.protocol import MAX_IMAGE_PIXELS

    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        raise RequestError("request must be a JSON object with a list 'messages'")
    for message in request["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and part.get("type") == "image_url":
                image_url = part.get("image_url")
                return decode_data_url(image_url.get("url") if isinstance(image_url, dict) else None,
                                       MAX_IMAGE_PIXELS)
    raise RequestError("no image_url part in messages: the stand-in scores the request's image")


def deqa_images(body: bytes) -> list[np.ndarray]:
    """The decoded JPEGs of a DeQA request, through the same plain-data unpickler and header-first pixel
    limits as the GenEval server."""
    from shared_rewards.geneval.protocol import PixelLimitError, ProtocolError, decode_jpegs, safe_loads

    try:
        request = safe_loads(body)
        if not isinstance(request, dict) or not isinstance(request.get("images"), (list, tuple)):
            raise ProtocolError("request must be a dict whose 'images' is a list of JPEG bytes")
        if not request["images"]:
            raise ProtocolError("images is empty")
        return decode_jpegs(request["images"])
    except PixelLimitError as exc:
        raise RequestError(str(exc), 413) from None
    except ProtocolError as exc:
        raise RequestError(str(exc)) from None


# --- HTTP -----------------------------------------------------------------------------------------------

class StandInServer(ThreadingHTTPServer):
    """A threaded HTTP server on an already bound socket, answering as `service`."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, service: str, sock: socket.socket):
        handler = _DeQAHandler if service == "deqa" else _ChatHandler
        super().__init__(sock.getsockname()[:2], handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]
        self.service = service
        self.requests_served = 0
        self.lock = threading.Lock()

    def health(self) -> dict:
        return {"service": self.service, "stand_in": True, "status": "ok", "ready": True, "pid": os.getpid(),
                "requests_served": self.requests_served,
                "scores": "deterministic, from the image's mean brightness; not the real model"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rsm-testkit-stand-in/1"
    post_path = "/"
    server: StandInServer

    def setup(self) -> None:
        self.timeout = READ_TIMEOUT_S
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def error_body(self, reason: str) -> tuple[bytes, str]:
        return (reason + "\n").encode(), "text/plain; charset=utf-8"

    def _fail(self, status: int, reason: str, *, body_unread: bool = False) -> None:
        if body_unread:  # what is left of the body would be read as the next request
            self.close_connection = True
        reason = " ".join(reason.split())[:1000]
        logger.info("%s %s -> %d %s", self.command, self.path, status, reason)
        self._send(status, *self.error_body(reason))

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            return self._fail(404, f"no such path {self.path!r}: POST {self.post_path} scores, GET /health reports")
        self._send(200, json.dumps(self.server.health()).encode(), "application/json")

    def do_POST(self) -> None:
        if self.path.split("?")[0] != self.post_path:
            return self._fail(404, f"no such path {self.path!r}: the {self.server.service} stand-in answers POST "
                                   f"{self.post_path}", body_unread=True)
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            return self._fail(411, "a Content-Length is required", body_unread=True)
        if int(length_text) > MAX_BODY_BYTES:
            return self._fail(413, f"body of {length_text} bytes is over the stand-in's limit of {MAX_BODY_BYTES}",
                              body_unread=True)
        body = self.rfile.read(int(length_text))
        if len(body) != int(length_text):
            self.close_connection = True  # the client went away mid-body
            return None
        try:
            status, answer, content_type = self.answer(body)
        except RequestError as exc:
            return self._fail(exc.status, str(exc))
        with self.server.lock:
            self.server.requests_served += 1
        self._send(status, answer, content_type)

    def answer(self, body: bytes) -> tuple[int, bytes, str]:
        raise NotImplementedError


class _DeQAHandler(_Handler):
    """reward-server app_deqa: POST / with pickle {"images": [JPEG bytes]} -> pickle {"outputs": [float]}."""

    def answer(self, body: bytes) -> tuple[int, bytes, str]:
        outputs = [deqa_score(image) for image in deqa_images(body)]
        logger.debug("POST / %d images -> 200", len(outputs))
        return 200, pickle.dumps({"outputs": outputs}), "application/octet-stream"


class _ChatHandler(_Handler):
    """OpenAI chat completions: one image per request, the answer in the text format the client parses."""

    post_path = CHAT_PATH

    def error_body(self, reason: str) -> tuple[bytes, str]:
        return json.dumps({"error": {"message": reason, "type": "invalid_request_error"}}).encode(), "application/json"

    def answer(self, body: bytes) -> tuple[int, bytes, str]:
        try:
            request = json.loads(body.decode("utf-8"))
        except ValueError:  # bad JSON and bad UTF-8
            raise RequestError("body is not JSON") from None
        text = CHAT_ANSWERS[self.server.service](chat_image(request))
        reply = {"id": f"chatcmpl-stand-in-{self.server.requests_served}", "object": "chat.completion",
                 "created": int(time.time()), "model": str(request.get("model", self.server.service)),
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": text}}]}
        return 200, json.dumps(reply).encode(), "application/json"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; OSError with one line when it cannot be had."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


def socket_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def geneval_server(sock: socket.socket, options: dict[str, Any]):
    """The real GenEval server of shared_rewards on the tiny detector and CLIP, bound to `sock`."""
    from shared_rewards.geneval.evaluator import load_evaluator
    from shared_rewards.geneval.serve import create_server

    from .factory import get_tiny_model

    kwargs = {"device": "cpu", "backend": "transformers", "detector": str(get_tiny_model("mask2former_coco")),
              "clip": str(get_tiny_model("clip_vit_l14")), **GENEVAL_STAND_IN_OPTIONS, **options}
    evaluator = load_evaluator(**kwargs)
    server = create_server(evaluator, sock=sock, device=str(kwargs["device"]), backend=str(kwargs["backend"]))
    server.info.update(service="geneval", stand_in=True, evaluator=kwargs)
    return server


# --- command line ----------------------------------------------------------------------------------------

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer in 0-65535 (0: a free port), got {text!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m rsm_testkit.services",
                       description="Stand-in reward servers for tests and --tiny runs (not the real models).")
    p.add_argument("service", choices=SERVICES)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=_port, default=0, help="0 (default) picks a free port")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="geneval only: a load_evaluator option, repeatable (stand-in defaults: threshold=0, "
                        "counting_threshold=0, the tiny kit's detector and clip, device cpu)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # a stand-in started by start() goes when its parent goes, even when the parent was SIGKILLed
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.service}-stand-in[%(process)d] %(message)s")
    options: dict[str, Any] = {}
    if args.option:
        if args.service != "geneval":
            parser.error(f"--option is for geneval only, not {args.service}")
        from shared_rewards.geneval.serve import parse_options

        try:
            options = parse_options(args.option)
        except ValueError as exc:
            parser.error(str(exc))

    stop = threading.Event()
    serving = False

    def on_signal(signum: int, frame: Any) -> None:
        if not serving:  # still loading: nothing to shut down
            raise SystemExit(0)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.exit_with_parent:
        parent = os.getppid()

        def watch_parent() -> None:
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    logger.warning("parent process %d is gone; stopping", parent)
                    stop.set()

        threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()

    try:
        sock = bind(args.host, args.port)  # before any model loads: a taken port costs nothing
    except OSError as exc:
        print(f"{parser.prog} {args.service}: {exc}", file=sys.stderr, flush=True)
        return 1
    if args.service == "geneval":
        try:
            server = geneval_server(sock, options)
        except ValueError as exc:  # a bad --option, named by load_evaluator before anything loads
            text = str(exc).splitlines()[0].removeprefix("geneval: ")
            print(f"{parser.prog} geneval: {text}", file=sys.stderr, flush=True)
            return 2
        except Exception as exc:
            logger.debug("geneval stand-in failed to load", exc_info=True)
            text = str(exc).splitlines()[0] if str(exc) else ""
            print(f"{parser.prog} geneval: cannot load the tiny evaluator: {type(exc).__name__}: {text}",
                  file=sys.stderr, flush=True)
            return 1
    else:
        server = StandInServer(args.service, sock)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                              name="serve")
    thread.start()
    serving = True
    print(f"listening on {socket_url(sock)}", flush=True)
    what = ("the real GenEval server on tiny random weights" if args.service == "geneval"
            else "deterministic scores from pixel brightness, not the real model")
    logger.info("%s stand-in (pid %d) serving on %s%s: %s", args.service, os.getpid(), socket_url(sock),
                url_path(args.service), what)
    while not stop.wait(1.0):  # a timed wait: signal handlers run between the waits
        if not thread.is_alive():
            logger.error("the server thread stopped")
            return 1
    server.shutdown()
    server.server_close()
    logger.info("stopped")
    return 0


# --- from Python --------------------------------------------------------------------------------------

class StandInError(RuntimeError):
    """A stand-in that exited or did not print its address in time; the message quotes its log."""


class StandIn:
    """A running stand-in process. `url` is what to give the reward's `url` option; `stop()` ends it."""

    def __init__(self, service: str, process: subprocess.Popen, log_file: Path):
        self.service = service
        self.process = process
        self.log_file = log_file
        self.base_url = ""

    @property
    def url(self) -> str:
        return self.base_url + url_path(self.service)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            match = LISTENING.search(self.log_file.read_text(errors="replace"))
            if match:
                self.base_url = match.group(1)
                return
            if self.process.poll() is not None:
                raise StandInError(f"{self.service} stand-in exited with code {self.process.returncode} before it "
                                   f"listened; last lines of {self.log_file}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise StandInError(f"{self.service} stand-in did not listen within {wait_s:g} s; last lines of "
                                   f"{self.log_file}:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after `timeout` s; the exit code (0 for a clean stop)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "StandIn":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start(service: str, *, host: str = "127.0.0.1", port: int = 0, wait_s: float = 120.0,
          log_file: str | os.PathLike | None = None, extra_args: Sequence[str] = (),
          env: dict[str, str] | None = None) -> StandIn:
    """Launches `python -m rsm_testkit.services <service>` (stdout and stderr into `log_file`, a temporary
    file by default) and returns once it prints its address. The stand-in exits with this process. Use as
    `with start("deqa") as service: load_reward("deqa", url=service.url)`."""
    url_path(service)  # an unknown name fails here, not in the child
    if log_file is None:
        handle, name = tempfile.mkstemp(prefix=f"rsm-{service}-stand-in-", suffix=".log")
        os.close(handle)
        log_file = name
    log_path = Path(log_file)
    cmd = [sys.executable, "-m", "rsm_testkit.services", service, "--host", host, "--port", str(port),
           "--exit-with-parent", *extra_args]
    # `python -m` puts the working directory first on sys.path, where a checkout's root would shadow the
    # installed shared_rewards with its component folder; the folder above this package holds no such name
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=Path(__file__).resolve().parents[1])
    stand_in = StandIn(service, process, log_path)
    try:
        stand_in.wait_ready(wait_s)
    except BaseException:
        stand_in.stop()
        raise
    return stand_in


if __name__ == "__main__":
    sys.exit(main())
