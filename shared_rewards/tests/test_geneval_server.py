"""The GenEval reward server over real HTTP on loopback, with the real evaluator on tiny checkpoints.

The detector is rsm_testkit's `mask2former_coco_dog_cat`: on every image it finds 4 dogs scoring 0.612 and 4
cats scoring 0.371 (full-image masks), so every expected number below is worked out by hand from the rules
of spec B.3-B.8. Requests are built here the way the upstream client builds them.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import queue
import signal
import socket
import threading
import time

import numpy as np
import pytest
import requests  # what the upstream clients post with (installed with diffusers in this repo's environment)
from PIL import Image, ImageFile

from shared_rewards.geneval.client import start_server
from shared_rewards.geneval.protocol import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, RESPONSE_KEYS, safe_loads
from shared_rewards.geneval.serve import (
    WORKER_HEADER,
    bind_socket,
    build_parser,
    create_server,
    main,
    parse_options,
    worker_devices,
)
from shared_rewards.geneval.vocabulary import TAGS

from geneval_http import serving

pytestmark = pytest.mark.timeout(120)  # a server bug must fail the test, not hang CI

DOG = {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]}
FOUR_DOGS = {"tag": "counting", "prompt": "a photo of four dogs", "include": [{"class": "dog", "count": 4}],
             "exclude": [{"class": "dog", "count": 5}]}
RED_DOG = {"tag": "colors", "prompt": "a photo of a red dog", "include": [{"class": "dog", "count": 1, "color": "red"}]}


@contextlib.contextmanager
def running(evaluator, **kwargs):
    with serving(create_server(evaluator, port=0, device="cpu", backend="transformers", **kwargs)) as server:
        yield server


@pytest.fixture(scope="module")
def server(evaluator):
    with running(evaluator) as s:
        yield s


def image(seed=0, size=32):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def upstream_jpeg(array):
    """flow_grpo's client: PIL JPEG, default quality (75), of an RGB uint8 HWC array."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


def upstream_post(url, payload, **kwargs):
    """As upstream posts: the raw pickle as the body, no Content-Type."""
    return requests.post(url, data=pickle.dumps(payload), timeout=60, **kwargs)


def request_for(metadatas, only_strict=False, seed=0):
    return {"images": [upstream_jpeg(image(seed + i)) for i in range(len(metadatas))], "meta_datas": metadatas,
            "only_strict": only_strict}


# --- protocol ------------------------------------------------------------------------------------------

def test_health_reports_device_backend_and_readiness(server):
    answer = requests.get(server.url + "/health", timeout=10)
    assert answer.status_code == 200
    health = answer.json()
    assert health["ready"] is True and health["device"] == "cpu" and health["backend"] == "transformers"
    assert health["pid"] == os.getpid() and answer.headers[WORKER_HEADER] == str(os.getpid())


def test_upstream_format_request_gets_the_upstream_response(server):
    answer = upstream_post(server.url, request_for([DOG, FOUR_DOGS, RED_DOG], only_strict=False))
    assert answer.status_code == 200, answer.text
    response = pickle.loads(answer.content)  # what an upstream client does with it
    assert set(response) == set(RESPONSE_KEYS)
    # DOG: 4 dogs > 0.3, count 1: count term 1 - |1 - 4| / 1 = -2; benchmark needs >= 1 (true), strict == 1 (false).
    # FOUR_DOGS: counting threshold 0.9 keeps no dog: 1 - 4/4 = 0, fails both rules.
    # RED_DOG: count term -2, and n_found != count with a colour clause appends 0: mean(-2, 0) = -1.
    #   Benchmark: the first dog's colour must be red; the tiny CLIP's guess decides, so only strict is fixed.
    assert response["scores"][:2] == [-2.0, 0.0] and response["scores"][2] == -1.0
    assert response["rewards"][:2] == [1.0, 0.0]
    assert response["strict_rewards"] == [0.0, 0.0, 0.0]
    assert response["group_rewards"]["single_object"] == [1.0, -10.0, -10.0]
    assert response["group_rewards"]["counting"] == [-10.0, 0.0, -10.0]
    assert response["group_strict_rewards"]["position"] == [-10.0, -10.0, -10.0]
    assert set(response["group_rewards"]) == set(TAGS)


def test_only_strict_skips_the_benchmark_rule(server):
    response = pickle.loads(upstream_post(server.url, request_for([DOG], only_strict=True)).content)
    assert response["scores"] == [-2.0] and response["rewards"] == [0.0]  # upstream reports False when skipped


def test_keep_alive_session_serves_several_requests(server):
    with requests.Session() as session:
        for _ in range(3):
            answer = session.post(server.url, data=pickle.dumps(request_for([DOG])), timeout=60)
            assert pickle.loads(answer.content)["scores"] == [-2.0]


def evil_reduce(target):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))
    return Evil()


def evil_open(target):
    class Evil:
        def __reduce__(self):
            return (open, (str(target), "w"))
    return Evil()


@pytest.mark.parametrize("make", [evil_reduce, evil_open])
@pytest.mark.parametrize("where", ["top", "inside"])
def test_a_crafted_pickle_is_rejected_and_runs_nothing(server, tmp_path, make, where):
    target = tmp_path / "pwned"
    evil = make(target)
    payload = evil if where == "top" else {"images": [evil], "meta_datas": [DOG], "only_strict": True}
    answer = upstream_post(server.url, payload)
    assert answer.status_code == 400
    assert "refused to load global" in answer.text and "\n" not in answer.text.strip()
    assert not target.exists()


def test_garbage_bytes_get_400_and_the_server_keeps_serving(server):
    for body in (b"", b"\x00\x01garbage", b"GET / HTTP/1.1\r\n", pickle.dumps({"a": 1})[:-3]):
        answer = requests.post(server.url, data=body, timeout=10)
        assert answer.status_code == 400, body
        assert "not a plain-data pickle" in answer.text or "must be a dict" in answer.text
    assert pickle.loads(upstream_post(server.url, request_for([DOG])).content)["scores"] == [-2.0]


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD = {"images": [upstream_jpeg(image())], "meta_datas": [DOG], "only_strict": True}
BAD_REQUESTS = [
    ([upstream_jpeg(image())], "request must be a dict"),
    ({"images": GOOD["images"], "meta_datas": [DOG]}, "missing key(s) ['only_strict']"),
    ({**GOOD, "prompts": ["a dog"]}, "unexpected key(s) [\"'prompts'\"]"),
    ({**GOOD, "images": upstream_jpeg(image())}, "images must be a list, got bytes"),
    ({**GOOD, "only_strict": "yes"}, "only_strict must be a bool, got str"),
    ({**GOOD, "meta_datas": [DOG, DOG]}, "got 1 images but 2 meta_datas"),
    ({**GOOD, "images": [], "meta_datas": []}, "images is empty"),
    ({**GOOD, "meta_datas": ["a photo of a dog"]}, "meta_datas[0] must be a dict, got str"),
    ({**GOOD, "images": [png_bytes(image())]}, "images[0] is not a decodable JPEG"),
    ({**GOOD, "images": [b"\xff\xd8\xff not really"]}, "images[0] is not a decodable JPEG"),
    ({**GOOD, "images": ["a string"]}, "images[0] must be JPEG bytes, got str"),
    ({**GOOD, "meta_datas": [{**DOG, "tag": "countin"}]}, "metadata[0].tag='countin': unknown tag"),
    ({**GOOD, "images": GOOD["images"] * 2,
      "meta_datas": [DOG, {**DOG, "include": [{"class": "unicorn", "count": 1}]}]},
     "metadata[1].include[0].class='unicorn'"),
]


@pytest.mark.parametrize("payload, reason", BAD_REQUESTS, ids=[r for _, r in BAD_REQUESTS])
def test_malformed_request_gets_400_naming_the_problem(server, payload, reason):
    answer = upstream_post(server.url, payload)
    assert answer.status_code == 400
    assert reason in answer.text
    assert answer.text.count("\n") == 1  # one line


def test_a_huge_image_is_refused_from_its_header(evaluator):
    with running(evaluator, max_image_pixels=1000) as s:
        answer = upstream_post(s.url, request_for([DOG]))  # 32 x 32 = 1024 pixels
    assert answer.status_code == 413
    assert answer.text == ("images[0] is 32x32 = 1024 pixels, over the per-image limit of 1000 pixels "
                           "(server option --max-image-pixels)\n")


@pytest.fixture(scope="module")
def jpeg_8000_squared():
    """A valid 8000 x 8000 JPEG of about 1 MB (one flat colour): 64 MP, 25.6 GB of detector masks if decoded."""
    buffer = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(buffer, format="JPEG")
    assert len(buffer.getvalue()) < 2_000_000
    return buffer.getvalue()


@pytest.fixture
def decodes(monkeypatch):
    """Counts pixel decodes: every PIL decode of a JPEG goes through ImageFile.load (headers do not)."""
    calls = []
    real_load = ImageFile.ImageFile.load

    def counting_load(self):
        calls.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return calls


def test_a_small_8000x8000_jpeg_gets_413_before_any_decode_and_the_server_keeps_serving(
        server, jpeg_8000_squared, decodes):
    payload = {"images": [upstream_jpeg(image()), jpeg_8000_squared], "meta_datas": [DOG, DOG], "only_strict": True}
    start = time.monotonic()
    answer = upstream_post(server.url, payload)
    assert time.monotonic() - start < 5  # reading two headers, not decoding 64 MP
    assert answer.status_code == 413
    assert answer.text == (f"images[1] is 8000x8000 = 64000000 pixels, over the per-image limit of "
                           f"{MAX_IMAGE_PIXELS} pixels (server option --max-image-pixels)\n")
    assert decodes == []  # not even the legal images[0]: every header is checked first
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert pickle.loads(upstream_post(server.url, GOOD).content)["scores"] == [-2.0]
    assert decodes and set(decodes) == {(32, 32)}  # the counter does see a legal request's decode


def test_legal_images_over_the_request_total_get_413_and_just_under_the_limits_score(evaluator, decodes):
    # 32 x 32 = 1024 pixels each: at the per-image limit; five of them are 5120 > 5000, four are 4096
    with running(evaluator, max_image_pixels=1024, max_request_pixels=5000) as s:
        over = upstream_post(s.url, request_for([DOG] * 5, only_strict=True))
        assert over.status_code == 413
        assert over.text == ("the request's 5 images have 5120 pixels in all, over the per-request limit of 5000 "
                             "pixels (server option --max-request-pixels); send fewer images per request\n")
        assert decodes == []
        under = upstream_post(s.url, request_for([DOG] * 4, only_strict=True))
        assert under.status_code == 200, under.text
        assert pickle.loads(under.content)["scores"] == [-2.0] * 4
        health = requests.get(s.url + "/health", timeout=10).json()
    assert health["max_image_pixels"] == 1024 and health["max_request_pixels"] == 5000


def test_default_pixel_limits_admit_training_and_eval_chunks_and_refuse_8000_squared():
    chunk = 64  # the client's batch_size, as upstream
    assert chunk * 512 * 512 * 2 <= MAX_REQUEST_PIXELS and chunk * 1024 * 1024 * 2 <= MAX_REQUEST_PIXELS
    assert 1024 * 1024 * 2 <= MAX_IMAGE_PIXELS < 8000 * 8000
    # what the limits bound: ~1.7 kB of float32 masks per pixel of one image, 3 B per decoded request pixel
    assert MAX_IMAGE_PIXELS * 100 * 4 * 4 < 4e9 and MAX_REQUEST_PIXELS * 3 < 0.5e9


@pytest.mark.parametrize("flag", ["--max-image-pixels", "--max-request-pixels"])
def test_pixel_limit_flags_are_shown_and_must_be_positive(flag, caplog):
    assert flag in build_parser().format_help()
    with caplog.at_level(logging.ERROR, logger="shared_rewards.geneval.serve"):
        assert main([flag, "0", "--device", "cpu", "--port", "0"]) == 2
    assert f"{flag} must be a positive number of pixels, got 0" in caplog.text
    with pytest.raises(ValueError, match=f"{flag[2:].replace('-', '_')} must be a positive int, got -1"):
        create_server(lambda *a: {}, port=0, **{flag[2:].replace("-", "_"): -1})


def raw_exchange(url, head: bytes, timeout=10.0) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_an_oversized_body_gets_413_before_it_is_read(evaluator):
    with running(evaluator, max_body_bytes=10_000) as s:
        # announces 10 GB and sends none of it: the answer must come from the header alone, then close
        start = time.monotonic()
        answer = raw_exchange(s.url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n")
        assert time.monotonic() - start < 5
        assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of 10000 bytes" in answer
        over = upstream_post(s.url, {**GOOD, "images": [b"\xff" * 20_000]})
        assert over.status_code == 413
        assert upstream_post(s.url, GOOD).status_code == 200


def test_other_paths_and_missing_length_get_4xx(server):
    assert requests.get(server.url + "/nothing", timeout=10).status_code == 404
    assert requests.post(server.url + "/score", data=b"x", timeout=10).status_code == 404
    answer = raw_exchange(server.url, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411")


class Failing:
    def __call__(self, images, metadatas, only_strict):
        raise RuntimeError("CUDA out of memory\nsecond line of detail")


@pytest.mark.parametrize("show_traceback", [False, True])
def test_an_evaluator_error_is_a_500_with_one_line(show_traceback, caplog):
    with running(Failing(), show_traceback=show_traceback) as s:
        answer = upstream_post(s.url, GOOD)
        assert answer.status_code == 500
        assert answer.text.splitlines()[0] == "evaluator failed: RuntimeError: CUDA out of memory"
        assert ("Traceback" in answer.text) == show_traceback
        assert requests.get(s.url + "/health", timeout=10).status_code == 200  # still serving


def test_numpy_numbers_from_an_evaluator_reach_clients_as_plain_floats(evaluator):
    def numpy_evaluator(images, metadatas, only_strict):
        response = evaluator(images, metadatas, only_strict)
        return {k: np.asarray(v, dtype=np.float32) if isinstance(v, list) else v for k, v in response.items()}

    with running(numpy_evaluator) as s:
        answer = upstream_post(s.url, GOOD)
    assert safe_loads(answer.content)["scores"] == [-2.0]  # a plain-data pickle: no numpy globals in it


def test_an_evaluator_answer_of_the_wrong_length_is_a_500(evaluator):
    with running(lambda images, mds, strict: evaluator(images[:1], mds[:1], strict)) as s:
        answer = upstream_post(s.url, request_for([DOG, DOG]))
    assert answer.status_code == 500 and "'scores' must be a list of 2 numbers" in answer.text


def test_concurrent_clients_each_get_their_own_answer(server):
    # counts 1..6 of dogs with 4 found: 1 - |k - 4| / k
    expected = {k: 1 - abs(k - 4) / k for k in range(1, 7)}
    results, errors = {}, []

    def client(k):
        try:
            md = {**DOG, "include": [{"class": "dog", "count": k}]}
            answer = upstream_post(server.url, request_for([md] * 3, seed=10 * k))
            results[k] = pickle.loads(answer.content)["scores"]
        except Exception as exc:  # surfaced below; a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results == {k: pytest.approx([v] * 3) for k, v in expected.items()}


def test_binding_beyond_loopback_warns(evaluator, caplog):
    with caplog.at_level(logging.WARNING, logger="shared_rewards.geneval.serve"):
        server = create_server(evaluator, host="0.0.0.0", port=0)
        server.server_close()
    assert "beyond loopback" in caplog.text
    with caplog.at_level(logging.WARNING, logger="shared_rewards.geneval.serve"):
        caplog.clear()
        create_server(evaluator, port=0).server_close()
    assert "beyond loopback" not in caplog.text


# --- command line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, workers, expected", [
    ("cuda:0", None, ["cuda:0"]),
    ("cuda", 3, ["cuda:0", "cuda:1", "cuda:2"]),
    ("cuda:2", 2, ["cuda:2", "cuda:3"]),
    ("cuda:0,cuda:3", None, ["cuda:0", "cuda:3"]),
    ("cpu", 2, ["cpu", "cpu"]),
])
def test_worker_devices(device, workers, expected):
    assert worker_devices(device, workers) == expected


@pytest.mark.parametrize("device, workers, message", [
    ("cuda:0,cuda:1", 3, "--workers 3 does not match the 2 devices"),
    ("cuda", 0, "--workers must be at least 1"),
    ("mps", 2, "needs a CUDA device or a device list"),
])
def test_worker_devices_errors(device, workers, message):
    with pytest.raises(ValueError, match=message):
        worker_devices(device, workers)


def test_parse_options_reads_json_values_and_names_bad_pairs():
    assert parse_options(["threshold=0.25", "max_objects=8", "bgcolor=#999", "crop=false"]) == {
        "threshold": 0.25, "max_objects": 8, "bgcolor": "#999", "crop": False}
    with pytest.raises(ValueError, match="--option must look like key=value, got 'threshold'"):
        parse_options(["threshold"])


def test_a_busy_worker_leaves_the_next_request_to_an_idle_one(evaluator):
    # two one-at-a-time servers on one socket, as pre-forked workers are; each evaluator holds its request
    # until released, so the second request must be taken by the worker that is not busy
    sock = bind_socket("127.0.0.1", 0)
    entered, release = queue.Queue(), threading.Event()

    def gated(name):
        def evaluate(images, metadatas, only_strict):
            entered.put(name)
            release.wait(30)
            return evaluator(images, metadatas, only_strict)
        return evaluate

    servers = [create_server(gated(name), sock=sock, one_at_a_time=True, worker=i, workers=2)
               for i, name in enumerate("AB")]
    with contextlib.ExitStack() as stack:
        for s in servers:
            stack.enter_context(serving(s))
        stack.callback(release.set)  # on failure too, so no worker stays parked in its evaluator
        url = servers[0].url
        for _ in range(10):  # a threaded server would take the second request itself about half the time
            release.clear()
            answers = []
            threads = [threading.Thread(target=lambda: answers.append(upstream_post(url, request_for([DOG]))),
                                        daemon=True) for _ in range(2)]
            threads[0].start()
            first = entered.get(timeout=10)
            threads[1].start()
            second = entered.get(timeout=3)  # a worker that took it while busy would block on its lock here
            assert {first, second} == {"A", "B"}
            release.set()
            for t in threads:
                t.join(timeout=30)
            assert [a.status_code for a in answers] == [200, 200]
            assert all(a.headers.get("Connection") == "close" for a in answers)


def test_two_cpu_workers_share_the_port_and_both_answer(tiny_paths, tmp_path):
    with start_server(port=0, device="cpu", workers=2, log_file=tmp_path / "server.log", wait_s=90,
                      **tiny_paths) as proc:
        pids = set()
        # a worker takes no new connection while busy (gunicorn-sync), so concurrent requests spread out
        for _ in range(5):
            answers = []
            threads = [threading.Thread(target=lambda: answers.append(upstream_post(proc.url, request_for([DOG] * 8))))
                       for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert [pickle.loads(a.content)["scores"] for a in answers] == [[-2.0] * 8] * 2
            pids |= {int(a.headers[WORKER_HEADER]) for a in answers}
            if len(pids) == 2:
                break
        assert len(pids) == 2 and proc.pid not in pids
        health = requests.get(proc.url + "/health", timeout=10).json()
        assert health["workers"] == 2 and health["pid"] in pids
        # a master killed outright cannot stop its workers; they notice and exit on their own
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie until its (dead) parent's reaper collects it: count it as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_bad_option_stops_the_server_with_its_reason(tiny_paths, tmp_path):
    from shared_rewards.geneval.client import GenEvalServerError

    with pytest.raises(GenEvalServerError, match="exited with code") as info:
        start_server(port=0, device="cpu", log_file=tmp_path / "server.log", wait_s=60,
                     options={"no_such_option": 1}, **tiny_paths)
    assert "unknown option 'no_such_option'" in str(info.value)


def test_health_json_is_small_and_plain(server):
    body = requests.get(server.url + "/health", timeout=10).content
    assert len(body) < 1000 and isinstance(json.loads(body), dict)
