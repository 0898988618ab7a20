"""The stand-in reward servers (`python -m rsm_testkit.services`) driven through the real shared_rewards
clients: each speaks its client's protocol, scores deterministically from the pixels, answers /health, prints
one `listening on` line and stops with exit 0 on SIGTERM."""
from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import torch

from rsm_testkit import services
from shared_rewards import load_reward

pytestmark = pytest.mark.timeout(120)  # a stand-in that never answers must fail the test, not hang CI

LIGHT = ("deqa", "qwenvl", "unifiedreward")
LISTENING_LINE = re.compile(r"listening on http://127\.0\.0\.1:(\d+)\n")
PROMPTS = ["a photo of a cat", "a red car", "a lighthouse at dusk", "two dogs"]
# Valid GenEval rows written for this test (one per kind of check), with their prompts.
GENEVAL_ROWS = [
    {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]},
    {"tag": "two_object", "prompt": "a photo of a cat and a chair",
     "include": [{"class": "cat", "count": 1}, {"class": "chair", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of two cups", "include": [{"class": "cup", "count": 2}],
     "exclude": [{"class": "cup", "count": 3}]},
    {"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]},
    {"tag": "position", "prompt": "a photo of a bench left of a bird",
     "include": [{"class": "bird", "count": 1}, {"class": "bench", "count": 1, "position": ["left of", 0]}]},
    {"tag": "color_attr", "prompt": "a photo of a blue bus and a yellow umbrella",
     "include": [{"class": "bus", "count": 1, "color": "blue"}, {"class": "umbrella", "count": 1, "color": "yellow"}]},
]


def graded_images(levels, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Noise of amplitude 0.2 centred on each brightness level: [n, 3, size, size] in [0, 1], distinct images
    whose mean brightness is about the level."""
    noise = torch.rand(len(levels), 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (torch.tensor(levels).view(-1, 1, 1, 1) + 0.2 * (noise - 0.5)).clamp(0, 1)


def score(name: str, url: str, images: torch.Tensor, rows=None) -> torch.Tensor:
    reward = load_reward(name, url=url)
    if rows is not None:
        return reward(images, [row["prompt"] for row in rows], rows).scores
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(images))]
    return reward(images, prompts).scores


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module", params=LIGHT)
def stand_in(request):
    with services.start(request.param, wait_s=30) as running:
        yield running


def test_scores_through_the_real_client_are_finite_float32_one_per_image(stand_in):
    scores = score(stand_in.service, stand_in.url, graded_images([0.2, 0.4, 0.6, 0.8, 0.5]))
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert torch.isfinite(scores).all()
    assert ((scores >= 0.2) & (scores <= 1.0)).all()  # the real scores' range, / 5


def test_same_images_get_the_same_scores(stand_in):
    images = graded_images([0.3, 0.5, 0.7], seed=1)
    assert score(stand_in.service, stand_in.url, images).tolist() == \
        score(stand_in.service, stand_in.url, images.clone()).tolist()


def test_different_images_get_different_scores_that_rise_with_brightness(stand_in):
    levels = [0.1, 0.3, 0.5, 0.7, 0.9]
    scores = score(stand_in.service, stand_in.url, graded_images(levels, seed=2)).tolist()
    if stand_in.service == "qwenvl":  # integer levels n / 5, n = floor(1 + 4b + u): dark 1-2, bright 4-5
        assert all(round(5 * s) == pytest.approx(5 * s, abs=1e-6) for s in scores)
        assert scores[0] <= 0.4 and scores[-1] >= 0.8
    else:  # 0.2 + 0.8 b, up to JPEG loss (deqa) or 4 decimals after a bicubic resize (unifiedreward)
        assert scores == pytest.approx([0.2 + 0.8 * b for b in levels], abs=0.01)
        assert scores == sorted(scores) and len(set(scores)) == len(scores)
    same_level = score(stand_in.service, stand_in.url, graded_images([0.5, 0.5, 0.5, 0.5], seed=3)).tolist()
    if stand_in.service != "qwenvl":  # five levels cannot tell four mid-grey images apart; the mean can
        assert len(set(same_level)) == 4


def test_health_answers_200_with_the_service_and_stand_in_flag(stand_in):
    parts = urlsplit(stand_in.url)
    status, payload = get(f"{parts.scheme}://{parts.netloc}/health")
    assert status == 200
    assert payload["service"] == stand_in.service and payload["stand_in"] is True


def test_malformed_request_is_a_4xx_with_one_line_and_the_stand_in_keeps_serving(stand_in):
    endpoint = stand_in.url + ("/chat/completions" if stand_in.service != "deqa" else "")
    status, body = post(endpoint, b"not a pickle nor JSON")
    assert status == 400
    text = body.decode()
    reason = json.loads(text)["error"]["message"] if stand_in.service != "deqa" else text.strip()
    assert reason and "\n" not in reason
    assert score(stand_in.service, stand_in.url, graded_images([0.5])).shape == (1,)


def read_line(stream, timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"no line on stdout within {timeout} s"
    return stream.readline()


@pytest.mark.parametrize("name", LIGHT)
def test_prints_exactly_one_listening_line_and_exits_0_on_sigterm(name):
    process = subprocess.Popen([sys.executable, "-m", "rsm_testkit.services", name, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = read_line(process.stdout, 30)
        assert LISTENING_LINE.fullmatch(line), line
        port = int(LISTENING_LINE.fullmatch(line).group(1))
        assert get(f"http://127.0.0.1:{port}/health")[0] == 200
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        assert time.monotonic() - start < 5
        assert process.stdout.read() == ""  # nothing after the one line
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


@pytest.mark.parametrize("args, message", [
    (["vllm"], "argument service: invalid choice: 'vllm' (choose from 'deqa', 'qwenvl', 'unifiedreward', "
               "'geneval')"),
    (["deqa", "--port", "70000"], "argument --port: must be an integer in 0-65535 (0: a free port), got '70000'"),
    (["deqa", "--port", "http"], "argument --port: must be an integer in 0-65535 (0: a free port), got 'http'"),
    (["qwenvl", "--option", "threshold=0.3"], "--option is for geneval only, not qwenvl"),
])
def test_bad_service_name_or_port_is_one_line_and_exit_2(args, message):
    result = subprocess.run([sys.executable, "-m", "rsm_testkit.services", *args], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"python -m rsm_testkit.services: error: {message}\n"


def test_geneval_bad_option_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "rsm_testkit.services", "geneval", "--option", "threshold=2"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == \
        "python -m rsm_testkit.services geneval: GenEvalOptions.threshold=2: must be in [0, 1]"


def test_taken_port_is_one_line_and_exit_1(stand_in):
    port = urlsplit(stand_in.url).port
    result = subprocess.run([sys.executable, "-m", "rsm_testkit.services", "deqa", "--port", str(port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert re.fullmatch(rf"python -m rsm_testkit\.services deqa: cannot listen on 127\.0\.0\.1:{port} \(.+\)\n",
                        result.stderr)


def test_stand_in_started_from_python_exits_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", (
        "import time; from rsm_testkit import services\n"
        "s = services.start('deqa', wait_s=30)\n"
        "print(s.process.pid, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        child = int(read_line(parent.stdout, 30))
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the stand-in outlived its parent by 10 s")
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


def test_url_path_is_what_each_clients_default_url_adds_to_the_address():
    from shared_rewards import deqa
    from shared_rewards.geneval import client
    from shared_rewards.qwenvl import QwenVLReward
    from shared_rewards.unifiedreward import UnifiedRewardReward

    defaults = {"deqa": deqa.DEFAULT_URL, "geneval": client.DEFAULT_URL, "qwenvl": QwenVLReward.default_url,
                "unifiedreward": UnifiedRewardReward.default_url}
    for name, default in defaults.items():
        assert urlsplit(default).path == services.url_path(name), name
    with pytest.raises(ValueError, match="unknown service 'hpsv2'"):
        services.url_path("hpsv2")


def test_geneval_stand_in_is_the_real_server_on_the_tiny_detector(tmp_path):
    """One process for every check: loading the tiny detector and CLIP takes seconds."""
    start = time.monotonic()
    with services.start("geneval", wait_s=90, log_file=tmp_path / "geneval.log") as running:
        startup_s = time.monotonic() - start
        status, health = get(running.url + "/health")
        assert status == 200 and health["service"] == "geneval" and health["stand_in"] is True
        assert health["backend"] == "transformers" and health["device"] == "cpu"  # the real server's fields
        rows = GENEVAL_ROWS * 3
        images = graded_images([0.15] * 6 + [0.5] * 6 + [0.85] * 6, size=64, seed=4)
        scores = score("geneval", running.url, images, rows)
        assert scores.dtype == torch.float32 and scores.shape == (18,)
        assert all(math.isfinite(s) for s in scores.tolist())
        assert score("geneval", running.url, images.clone(), rows).tolist() == scores.tolist()
        assert len(set(scores.tolist())) > 1, scores  # detections at threshold 0 depend on the image
        stop_start = time.monotonic()
        assert running.stop() == 0
        assert time.monotonic() - stop_start < 5
    print(f"geneval stand-in ready in {startup_s:.1f} s")
