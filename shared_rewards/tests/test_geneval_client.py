"""The `geneval` reward client against real servers on loopback: our server with the real evaluator on tiny
checkpoints, and small hand-written servers for the failure modes (503s, a hung server, a killed server).

The detector is rsm_testkit's `mask2former_coco_dog_cat`: 4 dogs (score 0.612) and 4 cats (0.371) on every
image, so a single_object clause "k dogs" scores 1 - |k - 4| / k (spec B.8 count term).
"""
from __future__ import annotations

import contextlib
import io
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from shared_rewards import CATALOGUE, RewardInputError, load_reward
from shared_rewards.geneval import client as client_module
from shared_rewards.__main__ import catalogue_rows
from shared_rewards.geneval.client import (
    MAX_BACKOFF_S,
    GenEvalServerError,
    filtered_means,
    resolve_url,
    start_server,
)
from shared_rewards.geneval.protocol import decode_jpeg, parse_request
from shared_rewards.geneval.scoring import ImageResult, batch_response
from shared_rewards.geneval.serve import create_server
from shared_rewards.geneval.vocabulary import TAGS
from shared_rewards.preprocess import to_uint8

from geneval_http import serving

pytestmark = pytest.mark.timeout(120)  # a client or server bug must fail the test, not hang CI


def dogs(k: int) -> dict:
    return {"tag": "single_object", "prompt": f"a photo of {k} dogs", "include": [{"class": "dog", "count": k}]}


def expected_dog_score(k: int) -> float:
    return 1 - abs(k - 4) / k


RED_DOG = {"tag": "colors", "prompt": "a photo of a red dog", "include": [{"class": "dog", "count": 1, "color": "red"}]}
DOG_AND_CAT = {"tag": "two_object", "prompt": "a photo of a dog and a cat",
               "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
DOG_LEFT_OF_CAT = {"tag": "position", "prompt": "a photo of a dog left of a cat",
                   "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}]}


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # [n, 3, size, size]


def call(reward, metadatas, x=None):
    x = images(len(metadatas)) if x is None else x
    return reward(x, [md["prompt"] for md in metadatas], metadatas)


class Recording:
    """Passes calls to the real evaluator and records each request's batch size."""

    def __init__(self, evaluator):
        self.evaluator, self.sizes = evaluator, []

    def __call__(self, images, metadatas, only_strict):
        self.sizes.append(len(images))
        return self.evaluator(images, metadatas, only_strict)


@pytest.fixture(scope="module")
def recorded(evaluator):
    recording = Recording(evaluator)
    with serving(create_server(recording, port=0, device="cpu")) as server:
        yield server, recording


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- configuration -----------------------------------------------------------------------------------

def test_geneval_is_in_the_catalogue_and_options_are_checked():
    assert CATALOGUE["geneval"] == "geneval.client:GenEvalReward"
    with pytest.raises(ValueError, match="geneval: unknown option 'batchsize'"):
        load_reward("geneval", batchsize=8)
    reward = load_reward("geneval", url="http://127.0.0.1:1", check_health=False)
    assert reward.needs_prompts and not reward.differentiable


def test_url_comes_from_the_option_then_our_env_then_the_upstream_env(monkeypatch):
    monkeypatch.delenv("RSM_GENEVAL_URL", raising=False)
    monkeypatch.delenv("TEMPFLOW_GENEVAL_REWARD_URL", raising=False)
    assert resolve_url(None) == "http://127.0.0.1:18085"
    monkeypatch.setenv("TEMPFLOW_GENEVAL_REWARD_URL", "http://10.0.0.2:18085/")
    assert resolve_url(None) == "http://10.0.0.2:18085"
    monkeypatch.setenv("RSM_GENEVAL_URL", "http://10.0.0.3:9000")
    assert resolve_url(None) == "http://10.0.0.3:9000"
    assert resolve_url("http://localhost:1234") == "http://localhost:1234"
    assert load_reward("geneval", check_health=False).url == "http://10.0.0.3:9000"


@pytest.mark.parametrize("url", ["127.0.0.1:18085", "ftp://host:1", "http://:80", "http://host:port"])
def test_a_bad_url_is_a_one_line_error(url):
    with pytest.raises(ValueError, match="geneval: url"):
        resolve_url(url)


@pytest.mark.parametrize("option, value, message", [
    ("batch_size", 0, "batch_size must be an int >= 1"),
    ("retry_timeout_s", -1, "retry_timeout_s must be a number of seconds >= 0"),
    ("retry_timeout_s", float("inf"), "retry_timeout_s must be a number of seconds >= 0"),
    ("jpeg_quality", 101, r"jpeg_quality must be an int in \[1, 100\]"),
    ("timeout", 0, "timeout must be a positive number"),
    ("backoff", 0.0, r"backoff must be in \(0, 4\] seconds"),
    ("backoff", 10.0, r"backoff must be in \(0, 4\] seconds"),
])
def test_bad_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        load_reward("geneval", check_health=False, **{option: value})


# --- scoring through the server ----------------------------------------------------------------------

def test_130_images_go_in_three_ordered_chunks_of_44_43_43(recorded):
    server, recording = recorded
    recording.sizes.clear()
    reward = load_reward("geneval", url=server.url)
    counts = [i % 7 + 1 for i in range(130)]  # 7 does not divide 43 or 44: a shuffled chunk changes the list
    out = call(reward, [dogs(k) for k in counts])
    assert recording.sizes == [44, 43, 43]
    assert out.scores.dtype == torch.float32 and out.scores.shape == (130,)
    assert out.scores.tolist() == pytest.approx([expected_dog_score(k) for k in counts])
    # strict: exactly k dogs, true only for k = 4
    assert out.extras["strict_accuracy"].tolist() == [float(k == 4) for k in counts]
    assert out.extras["single_object_strict_accuracy"].tolist() == [float(k == 4) for k in counts]
    assert set(out.extras["counting_strict_accuracy"].tolist()) == {-10.0}
    assert "accuracy" not in out.extras  # only_strict=True: the server does not compute the benchmark rule
    means = filtered_means(out.extras)
    assert means == {"strict_accuracy": pytest.approx(counts.count(4) / 130),
                     "single_object_strict_accuracy": pytest.approx(counts.count(4) / 130)}


def test_answers_equal_a_direct_evaluator_call_on_the_same_jpegs(recorded, evaluator):
    server, _ = recorded
    metadatas = [RED_DOG, DOG_AND_CAT, DOG_LEFT_OF_CAT, dogs(1), RED_DOG]
    x = images(len(metadatas), size=48, seed=3)
    out = call(load_reward("geneval", url=server.url, only_strict=False), metadatas, x)
    # the upstream client's path: round to uint8, PIL JPEG at its default quality, decoded by the server
    decoded = []
    for array in to_uint8(x):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        decoded.append(decode_jpeg(buffer.getvalue(), 0))
    direct = evaluator(decoded, metadatas, only_strict=False)
    assert out.scores.tolist() == pytest.approx(direct["scores"])
    assert out.extras["accuracy"].tolist() == direct["rewards"]
    assert out.extras["strict_accuracy"].tolist() == direct["strict_rewards"]
    for tag in TAGS:
        assert out.extras[f"{tag}_accuracy"].tolist() == direct["group_rewards"][tag]
        assert out.extras[f"{tag}_strict_accuracy"].tolist() == direct["group_strict_rewards"][tag]
    # hand-worked where the colour guess does not matter: two_object with 4 dogs and 4 cats, count 1 each:
    # (-2 + -2) / 2 = -2, benchmark true (>= 1 each); position: both count terms -2, then 0 for n != count
    # on the position clause: (-2 - 2 + 0) / 3
    assert out.scores[1].item() == pytest.approx(-2.0) and out.extras["accuracy"][1].item() == 1.0
    assert out.scores[2].item() == pytest.approx(-4 / 3)


def test_score_async_overlaps_and_copies_its_inputs(recorded):
    server, _ = recorded
    reward = load_reward("geneval", url=server.url)
    metadatas = [dogs(k) for k in (1, 2, 3, 4, 5)]
    x = images(5)
    future = reward.score_async(x, [md["prompt"] for md in metadatas], metadatas)
    x.fill_(2.0)  # the caller reuses its buffer at once; the request was already taken
    out = future.result(timeout=60)
    assert out.scores.tolist() == pytest.approx([expected_dog_score(k) for k in (1, 2, 3, 4, 5)])
    with pytest.raises(RewardInputError, match="must be in"):
        reward.score_async(x, [md["prompt"] for md in metadatas], metadatas)  # checked on the caller's thread
    reward.close()


def test_metadata_is_required_and_checked_before_sending(recorded):
    server, recording = recorded
    reward = load_reward("geneval", url=server.url)
    recording.sizes.clear()
    with pytest.raises(RewardInputError, match="needs one GenEval metadata dict per image"):
        reward(images(2), ["a", "b"], None)
    with pytest.raises(RewardInputError, match=r"metadata\[1\].tag='countin'"):
        call(reward, [dogs(1), {**dogs(1), "tag": "countin"}])
    with pytest.raises(RewardInputError, match=r"metadata\[0\].prompt='a photo of 1 dogs' differs from prompts\[0\]"):
        reward(images(1), ["a photo of a cat"], [dogs(1)])
    assert recording.sizes == []  # nothing reached the server
    relaxed = load_reward("geneval", url=server.url, check_prompts=False)
    assert relaxed(images(1), ["a photo of a cat"], [dogs(1)]).scores.tolist() == [-2.0]


def test_weighted_mix_reports_geneval_parts(recorded):
    server, _ = recorded
    mix = load_reward({"geneval": 2.0}, geneval={"url": server.url})
    out = call(mix, [dogs(2), dogs(4)])
    assert out.scores.tolist() == pytest.approx([0.0, 2.0])
    assert out.extras["geneval/strict_accuracy"].tolist() == [0.0, 1.0]


# --- failure modes ---------------------------------------------------------------------------------------

def test_a_request_over_the_servers_body_limit_is_named(evaluator):
    recording = Recording(evaluator)
    with serving(create_server(recording, port=0, max_body_bytes=10_000)) as server:
        metadatas = [dogs(1)] * 8
        x = images(8, size=64)  # random pixels: about 3.5 kB of JPEG each
        with pytest.raises(GenEvalServerError, match=f"a request of 8 images is [0-9]+ bytes, over the limit of "
                                                     f"10000 bytes of the server at {server.url}; lower batch_size"):
            call(load_reward("geneval", url=server.url), metadatas, x)
        assert recording.sizes == []  # known from /health: nothing was sent
        # without the health check the server's own 413 names the limit
        with pytest.raises(GenEvalServerError, match="answered HTTP 413: body of [0-9]+ bytes is over the limit of "
                                                     "10000 bytes"):
            call(load_reward("geneval", url=server.url, check_health=False), metadatas, x)
        assert call(load_reward("geneval", url=server.url, batch_size=2), metadatas, x).scores.tolist() == [-2.0] * 8


def test_no_server_at_construction_fails_at_once_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(GenEvalServerError, match=f"no reward server at {url} .*ConnectionRefusedError") as info:
        load_reward("geneval", url=url)
    assert time.monotonic() - start < 3
    assert "\n" not in str(info.value)


class Scripted(BaseHTTPRequestHandler):
    """Answers POSTs from a script of statuses (then 200 with a valid response); GET /health is a 404, as on
    an upstream server."""

    protocol_version = "HTTP/1.1"
    script: list[int] = []
    attempts = 0

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        cls = type(self)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls.attempts += 1
        status = cls.script.pop(0) if cls.script else 200
        if status == 200:
            _, metadatas, _ = parse_request(body)
            results = [ImageResult(score=0.5, correct=False, strict_correct=True, reason="") for _ in metadatas]
            payload = pickle.dumps(batch_response(metadatas, results))
        else:
            payload = f"status {status} from the script\nmore detail".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextlib.contextmanager
def scripted(statuses):
    handler = type("Handler", (Scripted,), {"script": list(statuses), "attempts": 0})
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler


def test_an_upstream_server_without_health_is_accepted_and_503s_are_retried():
    with scripted([503, 502]) as (url, handler):
        reward = load_reward("geneval", url=url, backoff=0.05)
        out = call(reward, [dogs(1), dogs(2)])
    assert out.scores.tolist() == [0.5, 0.5] and handler.attempts == 3


def test_persistent_503_gives_up_after_the_retry_budget_naming_url_attempts_option_and_last_failure():
    with scripted([503] * 10) as (url, handler):
        reward = load_reward("geneval", url=url, retry_timeout_s=0.3, backoff=0.1)
        start = time.monotonic()
        with pytest.raises(GenEvalServerError) as info:
            call(reward, [dogs(1)])
        elapsed = time.monotonic() - start
    assert handler.attempts == 3  # at once, after sleeping 0.1 s, after sleeping 0.2 s: the 0.3 s budget is spent
    assert 0.3 <= elapsed < 3.0
    message = str(info.value)
    assert message.startswith(f"geneval: {url} failed after 3 attempts in ")
    assert "(retry_timeout_s=0.3 s after the first failure; raise it to wait longer" in message
    assert message.endswith("last failure: HTTP 503: status 503 from the script") and "\n" not in message


def test_a_server_down_for_2_s_then_back_is_waited_for_with_the_default_budget():
    handler = type("Handler", (Scripted,), {"script": [], "attempts": 0})
    first = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = first.server_address[1]
    url = f"http://127.0.0.1:{port}"
    with serving(first):
        reward = load_reward("geneval", url=url)
        assert reward.retry_timeout_s >= 60
        assert call(reward, [dogs(1)]).scores.tolist() == [0.5]
    # the server is gone (connections refused) and comes back on the same port 2 s later, as after a restart
    back = threading.Event()
    restarted = []

    def restart():
        time.sleep(2.0)
        restarted.append(ThreadingHTTPServer(("127.0.0.1", port), handler))
        back.set()
        restarted[0].serve_forever(poll_interval=0.05)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        out = call(reward, [dogs(1), dogs(2)])
        elapsed = time.monotonic() - start
    finally:
        assert back.wait(10)
        restarted[0].shutdown()
        restarted[0].server_close()
        thread.join(timeout=10)
    assert out.scores.tolist() == [0.5, 0.5]
    assert 2.0 <= elapsed < 2.0 + MAX_BACKOFF_S + 1.0  # retried until it was back, at most one backoff late


def test_a_small_retry_budget_ends_in_bounded_time_with_one_line_naming_the_option():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every attempt is refused at once
    reward = load_reward("geneval", url=url, check_health=False, retry_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(GenEvalServerError) as info:
        call(reward, [dogs(1)])
    assert 0.5 <= time.monotonic() - start < 2.0
    message = str(info.value)
    assert message.startswith(f"geneval: {url} failed after ")
    assert "retry_timeout_s=0.5 s after the first failure; raise it" in message
    assert "last failure: ConnectionRefusedError" in message and "\n" not in message
    assert int(message.split(" failed after ")[1].split()[0]) >= 2  # it did retry


def test_the_retry_budget_is_listed_with_the_other_options():
    options = {name: opts for name, _, _, opts in catalogue_rows()}["geneval"]
    assert "retry_timeout_s=120.0" in options and "backoff=0.5" in options and "retries" not in options


@pytest.mark.parametrize("status", [500, 400, 404, 413, 429])
def test_a_500_or_4xx_is_not_retried_even_with_a_long_budget(status):
    with scripted([status] * 5) as (url, handler):
        reward = load_reward("geneval", url=url, retry_timeout_s=30, backoff=4.0)
        start = time.monotonic()
        with pytest.raises(GenEvalServerError, match=f"geneval: {url} answered HTTP {status}: status {status} from "
                                                     f"the script$"):
            call(reward, [dogs(1)])
    assert handler.attempts == 1 and time.monotonic() - start < 2


def test_a_hung_server_fails_after_the_timeout_without_retrying():
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts into its backlog, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        reward = load_reward("geneval", url=url, check_health=False, timeout=1.0, retry_timeout_s=30, backoff=4.0)
        start = time.monotonic()
        with pytest.raises(GenEvalServerError, match=f"{url} did not answer 2 images within timeout=1 s"):
            call(reward, [dogs(1), dogs(2)])
        assert 1.0 <= time.monotonic() - start < 3.0
        with pytest.raises(GenEvalServerError, match="no reward server at"):
            load_reward("geneval", url=url, health_timeout=0.5)


SLOW_SECOND_CALL_SERVER = """
import time
from shared_rewards.geneval.scoring import ImageResult, batch_response
from shared_rewards.geneval.serve import create_server

calls = []

def evaluator(images, metadatas, only_strict):
    calls.append(len(images))
    if len(calls) == 2:
        print("busy", flush=True)
        time.sleep(600)
    return batch_response(metadatas, [ImageResult(0.25, False, False, "") for _ in images])

server = create_server(evaluator, port=0)
print(server.url, flush=True)
server.serve_forever()
"""


def test_a_server_killed_mid_run_fails_the_client_within_its_bound():
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_CALL_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        reward = load_reward("geneval", url=url, retry_timeout_s=0.6, backoff=0.2, timeout=60)
        metadatas = [dogs(1)] * 130
        future = reward.score_async(images(130, size=16), [md["prompt"] for md in metadatas], metadatas)
        assert proc.stdout.readline().strip() == "busy"  # chunk 2 of 3 is in the server's hands
        killed = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        with pytest.raises(GenEvalServerError) as info:
            future.result(timeout=30)
        elapsed = time.monotonic() - killed
    finally:
        proc.kill()
        proc.wait()
    # bound: the broken request, then retries refused after sleeping 0.2 and 0.4 s, the end of the 0.6 s budget
    assert 0.6 <= elapsed < 0.6 + 2.0
    message = str(info.value)
    assert message.startswith(f"geneval: {url} failed after 3 attempts")
    assert "ConnectionRefusedError" in message and "\n" not in message
    reward.close()


def test_start_server_runs_a_real_server_and_tears_it_down(tiny_paths, tmp_path):
    log = tmp_path / "server.log"
    with start_server(port=0, device="cpu", log_file=log, wait_s=90, **tiny_paths) as server:
        assert server.process.poll() is None
        reward = load_reward("geneval", url=server.url)
        assert reward.health()["ready"] is True
        out = call(reward, [dogs(1), dogs(4)])
        assert out.scores.tolist() == pytest.approx([-2.0, 1.0])
        url = server.url
    assert server.process.poll() is not None
    assert "POST / 2 images only_strict=True -> 200" in log.read_text()
    with pytest.raises(GenEvalServerError, match="no reward server at"):
        load_reward("geneval", url=url)


def test_start_server_that_is_not_ready_in_time_is_stopped(tiny_paths, tmp_path, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(client_module.subprocess, "Popen", recording_popen)
    with pytest.raises(GenEvalServerError, match=r"geneval server not ready after 0.5 s; last lines of"):
        start_server(port=0, device="cpu", log_file=tmp_path / "server.log", wait_s=0.5, **tiny_paths)
    assert len(started) == 1 and started[0].poll() is not None
