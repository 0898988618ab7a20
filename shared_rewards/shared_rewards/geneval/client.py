"""The GenEval reward as a client of a reward server (ours, `python -m shared_rewards.geneval.serve`, or
upstream's): `load_reward("geneval", url=...)`.

    with start_server(port=18085, device="cuda:0") as server:      # or start the server by hand
        reward = load_reward("geneval", url=server.url)
        future = reward.score_async(images, prompts, metadata)     # overlaps with the next sampling step
        scores, extras = future.result()

Requests follow the upstream client (flow_grpo `geneval_score`): images as PIL JPEG (quality 75) of the
rounded uint8 images, at most 64 per request in nearly equal chunks (np.array_split), posted one after the
other and merged in order. Failures differ on purpose: upstream retries up to 1000 times (hours of silence
for a dead server); here only connection failures and 502/503/504 are retried, for up to `retry_timeout_s`
seconds after the first failure (long enough for a restarting server) with exponential backoff capped at
MAX_BACKOFF_S, and every failure ends in one error naming the URL and the reason.

`scores` are the server's partial-credit `scores` (the training reward, spec B.8; not confined to [0, 1]).
`extras` hold per-image float tensors [B] under the upstream logging names: `strict_accuracy` and
`<tag>_strict_accuracy`, plus `accuracy` and `<tag>_accuracy` (the benchmark rule) when `only_strict=False`
(with `only_strict=True` the server does not compute it and would send zeros, so they are left out). Per-tag
rows keep the upstream -10.0 filler for images of other tags; `filtered_means(extras)` averages without them.
"""
from __future__ import annotations

import collections
import http.client
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlsplit

import numpy as np
import torch

from ..base import Reward, RewardInputError, RewardOutput, validate_inputs
from ..http_service import resolve_service_url
from ..preprocess import to_uint8
from .metadata import validate_metadata
from .protocol import JPEG_QUALITY, ProtocolError, check_response, encode_jpeg, encode_request, safe_loads
from .vocabulary import TAGS

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:18085"  # upstream gunicorn.conf.py bind
URL_ENV = ("RSM_GENEVAL_URL", "TEMPFLOW_GENEVAL_REWARD_URL")  # ours first, then the upstream name
GROUP_FILLER = -10.0  # upstream's value for rows of another tag
RETRY_STATUSES = (502, 503, 504)  # a proxy or a restarting server; anything else will not get better
# A restarted server imports torch and loads Mask2Former and CLIP ViT-L before it listens again (tens of
# seconds on a GPU node); two minutes rides that out, where a few retries in ~7 s ended the training run.
DEFAULT_RETRY_TIMEOUT_S = 120.0
MAX_BACKOFF_S = 4.0  # polls a restarting server at least this often, so training resumes soon after it is back


class GenEvalServerError(RuntimeError):
    """The reward server could not be reached or refused the request; the message names the URL."""


def resolve_url(url: str | None) -> str:
    """The option, else $RSM_GENEVAL_URL, else $TEMPFLOW_GENEVAL_REWARD_URL, else the upstream default."""
    return resolve_service_url("geneval", url, URL_ENV, DEFAULT_URL)


def filtered_means(extras: dict[str, Any]) -> dict[str, float]:
    """Mean of each accuracy tensor over the rows that are not the -10.0 filler, as upstream trainers log
    `eval_reward_<key>`; keys with no such row are left out."""
    out = {}
    for key, values in extras.items():
        if not key.endswith("accuracy") or not isinstance(values, torch.Tensor):
            continue
        kept = values[values != GROUP_FILLER]
        if kept.numel():
            out[key] = kept.float().mean().item()
    return out


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "").strip()[:500]


class GenEvalReward(Reward):
    """GenEval partial-credit reward from a reward server. Not differentiable; needs metadata (one GenEval
    metadata dict per image, spec B.2) and prompts."""

    name = "geneval"
    differentiable = False
    needs_prompts = True
    weights_source = "a GenEval reward server: python -m shared_rewards.geneval.serve (see start_server)"

    def __init__(self, device="cpu", dtype=torch.float32, *, url: str | None = None, only_strict: bool = True,
                 batch_size: int = 64, jpeg_quality: int = JPEG_QUALITY, timeout: float = 120.0,
                 retry_timeout_s: float = DEFAULT_RETRY_TIMEOUT_S, backoff: float = 0.5,
                 connect_timeout: float = 10.0, check_health: bool = True,
                 health_timeout: float = 5.0, check_prompts: bool = True):
        """url: server address (default: $RSM_GENEVAL_URL, $TEMPFLOW_GENEVAL_REWARD_URL, http://127.0.0.1:18085).
        only_strict: skip the benchmark rule on the server (training; upstream default there). batch_size:
        images per request (upstream 64). jpeg_quality: 75 is PIL's default, as upstream. timeout: seconds
        to wait for one answer (upstream 120); a timed-out request is not retried, since the server is still
        busy with it. retry_timeout_s: after a connection failure or 502/503/504, keep retrying for this many
        seconds (0: never retry), sleeping backoff * 2**k s (at most MAX_BACKOFF_S) before retry k+1.
        check_health: GET /health now, so a missing server fails here and not at the first reward.
        check_prompts: each metadata's "prompt" must equal the prompt given."""
        super().__init__(device, dtype)
        self.url = resolve_url(url)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
            raise ValueError(f"{self.name}: jpeg_quality must be an int in [1, 100], got {jpeg_quality!r}")
        for key, value in (("timeout", timeout), ("connect_timeout", connect_timeout),
                           ("health_timeout", health_timeout)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{self.name}: {key} must be a positive number of seconds, got {value!r}")
        if isinstance(retry_timeout_s, bool) or not isinstance(retry_timeout_s, (int, float)) \
                or not 0 <= retry_timeout_s < math.inf:
            raise ValueError(f"{self.name}: retry_timeout_s must be a number of seconds >= 0, got {retry_timeout_s!r}")
        if isinstance(backoff, bool) or not isinstance(backoff, (int, float)) or not 0 < backoff <= MAX_BACKOFF_S:
            # 0 would hammer a restarting server with thousands of attempts
            raise ValueError(f"{self.name}: backoff must be in (0, {MAX_BACKOFF_S:g}] seconds, got {backoff!r}")
        self.only_strict = bool(only_strict)
        self.batch_size = batch_size
        self.jpeg_quality = jpeg_quality
        self.timeout = float(timeout)
        self.retry_timeout_s = float(retry_timeout_s)
        self.backoff = float(backoff)
        self.connect_timeout = float(connect_timeout)
        self.check_prompts = check_prompts
        parts = urlsplit(self.url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port or (443 if self._https else 80)
        self._path = parts.path or "/"
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        # our server reports its body limit; checking it here names the cause, where a refused upload of a
        # large body would only show up as a broken pipe
        self.server_max_body_bytes: int | None = None
        if check_health:
            limit = self.health(timeout=health_timeout).get("max_body_bytes")
            self.server_max_body_bytes = limit if isinstance(limit, int) and limit > 0 else None

    # --- transport -------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        """One HTTP exchange on a fresh connection (no pooled connection can go stale between steps)."""
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=min(self.connect_timeout, timeout))
        try:
            try:
                conn.connect()
            except TimeoutError:  # nothing answered the SYN: a connection failure, unlike a slow answer
                raise ConnectionError(f"connect timed out after {conn.timeout:g} s") from None
            conn.sock.settimeout(timeout)
            conn.request(method, path, body=body)  # no Content-Type, as upstream; Content-Length is set
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def health(self, timeout: float = 5.0) -> dict:
        """The server's /health JSON. Raises GenEvalServerError at once if nothing answers. An upstream
        server has no /health; any HTTP answer shows it is up, and gives {"status": "no /health"}."""
        path = self._path.rstrip("/") + "/health"
        try:
            status, body = self._request("GET", path, None, timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise GenEvalServerError(
                f"{self.name}: no reward server at {self.url} ({type(exc).__name__}: {exc}); start one with "
                f"`python -m shared_rewards.geneval.serve --port {self._port}` or pass check_health=False") from None
        if status != 200:
            logger.info("%s: %s answered GET /health with HTTP %d (an upstream server?)", self.name, self.url, status)
            return {"status": "no /health", "http_status": status}
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "unreadable /health", "http_status": status}

    def _post(self, body: bytes, batch: int) -> dict:
        if self.server_max_body_bytes is not None and len(body) > self.server_max_body_bytes:
            raise GenEvalServerError(f"{self.name}: a request of {batch} images is {len(body)} bytes, over the limit "
                                     f"of {self.server_max_body_bytes} bytes of the server at {self.url}; lower "
                                     f"batch_size or start the server with a larger --max-body-mb")
        start = time.monotonic()
        attempts = 0
        first_failure: float | None = None  # the budget counts from here: a long answer spends none of it
        last = ""
        while True:
            if first_failure is not None:
                waited = time.monotonic() - first_failure
                if waited >= self.retry_timeout_s:
                    raise GenEvalServerError(
                        f"{self.name}: {self.url} failed after {attempts} attempts in {time.monotonic() - start:.1f} s "
                        f"(retry_timeout_s={self.retry_timeout_s:g} s after the first failure; raise it to wait "
                        f"longer for a restarting server); last failure: {last}")
                delay = min(self.backoff * 2 ** min(attempts - 1, 16), MAX_BACKOFF_S, self.retry_timeout_s - waited)
                logger.warning("%s: %s failed (%s); retry %d in %.1f s (%.0f of retry_timeout_s=%g s used)",
                               self.name, self.url, last, attempts, delay, waited, self.retry_timeout_s)
                time.sleep(delay)
            attempts += 1
            try:
                status, payload = self._request("POST", self._path, body, self.timeout)
            except TimeoutError:
                raise GenEvalServerError(
                    f"{self.name}: {self.url} did not answer {batch} images within timeout={self.timeout:g} s "
                    f"(not retried: the server is still busy with them); raise timeout or lower batch_size") from None
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, closed before answering
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                first_failure = time.monotonic() if first_failure is None else first_failure
                continue
            if status == 200:
                try:
                    return check_response(safe_loads(payload), batch)
                except ProtocolError as exc:
                    raise GenEvalServerError(f"{self.name}: {self.url} sent an unusable answer: {exc}") from None
            reason = _first_line(payload.decode("utf-8", "replace")) or http.client.responses.get(status, "")
            if status in RETRY_STATUSES:
                last = f"HTTP {status}: {reason}"
                first_failure = time.monotonic() if first_failure is None else first_failure
                continue
            raise GenEvalServerError(f"{self.name}: {self.url} answered HTTP {status}: {reason}")

    # --- scoring ---------------------------------------------------------------------------------------

    def _check_metadata(self, prompts: Sequence[str] | None, metadata: Sequence[dict] | None) -> list[dict]:
        if metadata is None:
            raise RewardInputError(f"{self.name}: needs one GenEval metadata dict per image, got metadata=None")
        out = []
        for i, md in enumerate(metadata):
            try:
                out.append(validate_metadata(md, i))
            except ValueError as exc:
                raise RewardInputError(f"{self.name}: {exc}") from None
            if self.check_prompts and prompts is not None and md["prompt"] != prompts[i]:
                raise RewardInputError(f"{self.name}: metadata[{i}].prompt={md['prompt']!r} differs from prompts[{i}]="
                                       f"{prompts[i]!r} (misaligned metadata? pass check_prompts=False if intended)")
        return out

    def score_arrays(self, arrays: np.ndarray | Sequence[np.ndarray], metadata: Sequence[dict],
                     device: str | torch.device = "cpu") -> RewardOutput:
        """Scores uint8 RGB images ([B, H, W, 3] or a list of [H, W, 3]) with already checked metadata."""
        n = len(arrays)
        merged: dict[str, Any] = {"scores": [], "rewards": [], "strict_rewards": [],
                                  "group_rewards": collections.defaultdict(list),
                                  "group_strict_rewards": collections.defaultdict(list)}
        # upstream: np.array_split into ceil(n / 64) nearly equal chunks, posted one after the other
        for chunk in np.array_split(np.arange(n), math.ceil(n / self.batch_size)):
            jpegs = [encode_jpeg(np.ascontiguousarray(arrays[i]), self.jpeg_quality) for i in chunk]
            body = encode_request(jpegs, [metadata[i] for i in chunk], self.only_strict)
            response = self._post(body, len(chunk))
            for key in ("scores", "rewards", "strict_rewards"):
                merged[key].extend(response[key])
            for key in ("group_rewards", "group_strict_rewards"):
                for tag, values in response[key].items():
                    merged[key][tag].extend(values)

        def tensor(values: list) -> torch.Tensor:  # [B] float32
            return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)

        extras: dict[str, Any] = {"strict_accuracy": tensor(merged["strict_rewards"])}
        extras.update({f"{tag}_strict_accuracy": tensor(merged["group_strict_rewards"][tag]) for tag in TAGS})
        if not self.only_strict:
            extras["accuracy"] = tensor(merged["rewards"])
            extras.update({f"{tag}_accuracy": tensor(merged["group_rewards"][tag]) for tag in TAGS})
        return RewardOutput(tensor(merged["scores"]), extras)

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None,
              metadata: Sequence[dict] | None) -> RewardOutput:
        checked = self._check_metadata(prompts, metadata)
        return self.score_arrays(to_uint8(images), checked, images.device)  # [B, H, W, 3] uint8

    def score_async(self, images: torch.Tensor, prompts: Sequence[str] | None = None,
                    metadata: Sequence[dict] | None = None) -> Future:
        """Like calling the reward, but the HTTP part runs on one background thread; returns a Future of
        RewardOutput. Inputs are checked and copied to uint8 here, so the caller may reuse `images` at once."""
        validate_inputs(self.name, images, prompts, metadata, self.needs_prompts)
        checked = self._check_metadata(prompts, metadata)
        arrays = to_uint8(images)  # [B, H, W, 3] uint8 on the CPU, a copy
        device = images.device
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geneval-reward")
            return self._executor.submit(self.score_arrays, arrays, checked, device)

    def close(self) -> None:
        """Waits for pending score_async calls and stops their thread."""
        with self._executor_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None


# --- starting a server beside a training run ----------------------------------------------------------

_LISTENING = re.compile(r"listening on (http://\S+)")
_READY = re.compile(r"worker \d+ \(pid \d+\) ready on ")


class ServerProcess:
    """A reward server subprocess (its own process group, so workers go with it). Context manager."""

    def __init__(self, process: subprocess.Popen, log_file: Path, workers: int):
        self.process = process
        self.log_file = log_file
        self.workers = workers
        self.url: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout` s."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        self._signal(signal.SIGKILL)  # workers that outlived their master

    def wait_ready(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            if self.process.poll() is not None:
                raise GenEvalServerError(f"geneval server exited with code {self.process.returncode} before it was "
                                         f"ready; last lines of {self.log_file}:\n{self.log_tail()}")
            text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            match = _LISTENING.search(text)
            if match and len(_READY.findall(text)) >= self.workers:
                self.url = match.group(1)
                try:
                    GenEvalReward(url=self.url, check_health=True, health_timeout=2.0)
                    return
                except GenEvalServerError:
                    pass
            if time.monotonic() > deadline:
                raise GenEvalServerError(f"geneval server not ready after {wait_s:g} s; last lines of "
                                         f"{self.log_file}:\n{self.log_tail()}")
            time.sleep(0.2)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_server(port: int = 18085, device: str | None = None, workers: int | None = None, *,
                 host: str = "127.0.0.1", log_file: str | os.PathLike | None = None, wait_s: float = 600.0,
                 backend: str = "transformers", detector: str | None = None, clip: str | None = None,
                 options: dict[str, Any] | None = None, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Launches `python -m shared_rewards.geneval.serve` and waits until every worker is ready and /health
    answers (`server.url`; port 0 picks a free port). On failure or timeout the server is stopped and the
    error quotes the end of its log. Use as `with start_server(...) as server:` to stop it on exit."""
    from .serve import worker_devices

    n_workers = len(worker_devices(device, workers))
    cmd = [sys.executable, "-m", "shared_rewards.geneval.serve", "--host", host, "--port", str(port),
           "--backend", backend]
    if device is not None:
        cmd += ["--device", device]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    cmd += [a for k, v in (("--detector", detector), ("--clip", clip)) if v is not None for a in (k, str(v))]
    cmd += [a for k, v in (options or {}).items() for a in ("--option", f"{k}={json.dumps(v)}")]
    cmd += list(extra_args)
    if log_file is None:
        handle, name = tempfile.mkstemp(prefix="geneval-server-", suffix=".log")
        os.close(handle)
        log_file = name
    log_path = Path(log_file)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    server = ServerProcess(process, log_path, n_workers)
    try:
        server.wait_ready(wait_s)
    except BaseException:
        server.stop()
        raise
    logger.info("geneval server ready at %s (pid %d, log %s)", server.url, server.pid, log_path)
    return server
