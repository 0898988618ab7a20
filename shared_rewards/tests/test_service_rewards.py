"""The service-backed rewards `deqa`, `unifiedreward` and `qwenvl` against fake servers on loopback that speak
each protocol: what the client sends, how answers become scores, order across chunks and concurrent requests,
and the one-line errors when nothing listens, nothing answers or the answer is malformed."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import pickle
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from shared_rewards import CATALOGUE, load_reward
from shared_rewards.deqa import DeQAServerError
from shared_rewards.openai_chat import ChatServerError
from shared_rewards.preprocess import to_uint8
from shared_rewards.qwenvl import RUBRIC, parse_score_tag
from shared_rewards.unifiedreward import parse_final_score

from geneval_http import serving

pytestmark = pytest.mark.timeout(120)  # a client bug must fail the test, not hang CI


# --- a recording fake server ------------------------------------------------------------------------

class Recorded:
    """Every request the fake server got: (path, headers, body), in arrival order."""

    def __init__(self):
        self.requests: list[tuple[str, dict, bytes]] = []
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    respond: Callable[[str, dict, bytes], tuple[int, bytes]]
    recorded: Recorded

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.recorded.lock:
            self.recorded.requests.append((self.path, headers, body))
        status, payload = type(self).respond(self.path, headers, body)
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@contextlib.contextmanager
def fake_server(respond: Callable[[str, dict, bytes], tuple[int, bytes]]):
    """A threaded HTTP server on a free loopback port; yields (base URL, Recorded)."""
    recorded = Recorded()
    handler = type("FakeHandler", (Handler,), {"respond": staticmethod(respond), "recorded": recorded})
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorded


def closed_port_url(path: str = "") -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@contextlib.contextmanager
def silent_listener():
    """A socket that accepts connections (through its backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def grey_images(levels: list[float], size: int = 32) -> torch.Tensor:
    """One flat grey image per level in [0, 1]: [n, 3, size, size]; the brightness says which image it is."""
    return torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()


def random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))  # [n, 3, h, w]


def brightness(image: Image.Image) -> float:
    return float(np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255.0)


# --- DeQA: a fake reward-server app_deqa ------------------------------------------------------------

def deqa_brightness(path, headers, body):
    """Scores each JPEG by its mean brightness, as plain floats under "outputs"."""
    request = pickle.loads(body)
    images = [Image.open(io.BytesIO(data), formats=["JPEG"]) for data in request["images"]]
    return 200, pickle.dumps({"outputs": [brightness(im) for im in images]})


def test_deqa_sends_upstreams_pickle_of_jpegs_to_the_url_itself():
    x = random_images(3, h=40, w=24)
    with fake_server(deqa_brightness) as (url, recorded):
        out = load_reward("deqa", url=url)(x)
    [(path, headers, body)] = recorded.requests
    assert path == "/" and headers["content-type"] == "application/octet-stream"  # raw bytes to the root
    request = pickle.loads(body)
    assert list(request) == ["images"]
    # byte for byte what upstream's client sends: PIL JPEG at its default quality of the rounded uint8 image
    for data, array in zip(request["images"], to_uint8(x)):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG")
        assert data == buffer.getvalue()
        assert Image.open(io.BytesIO(data)).size == (24, 40)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3,) and out.extras == {}


def test_deqa_keeps_image_order_across_chunks():
    levels = [i / 9 for i in range(10)]
    with fake_server(deqa_brightness) as (url, recorded):
        out = load_reward("deqa", url=url, batch_size=4)(grey_images(levels))
    sizes = [len(pickle.loads(body)["images"]) for _, _, body in recorded.requests]
    assert sizes == [4, 3, 3]  # np.array_split into ceil(10 / 4) nearly equal chunks, as upstream
    assert out.scores.tolist() == pytest.approx(levels, abs=0.02)


def test_deqa_splits_130_images_into_chunks_of_44_43_43_by_default():
    calls = []

    def numbered(path, headers, body):  # each score says which request and which position it came from
        n = len(pickle.loads(body)["images"])
        calls.append(n)
        return 200, pickle.dumps({"outputs": [1000.0 * (len(calls) - 1) + j for j in range(n)]})

    with fake_server(numbered) as (url, recorded):
        out = load_reward("deqa", url=url)(random_images(130, h=8, w=8))
    assert [len(pickle.loads(b)["images"]) for _, _, b in recorded.requests] == [44, 43, 43]
    expected = [float(j) for j in range(44)] + [1000.0 + j for j in range(43)] + [2000.0 + j for j in range(43)]
    assert out.scores.tolist() == expected


def test_deqa_url_comes_from_the_option_then_the_upstream_env(monkeypatch):
    monkeypatch.delenv("TEMPFLOW_DEQA_REWARD_URL", raising=False)
    assert load_reward("deqa").url == "http://127.0.0.1:18086"
    monkeypatch.setenv("TEMPFLOW_DEQA_REWARD_URL", "http://10.0.0.7:9000/")
    assert load_reward("deqa").url == "http://10.0.0.7:9000"
    assert load_reward("deqa", url="http://localhost:1234").url == "http://localhost:1234"


def test_deqa_with_nothing_listening_is_one_line_naming_url_option_env_and_start_command():
    url = closed_port_url()
    reward = load_reward("deqa", url=url)
    start = time.monotonic()
    with pytest.raises(DeQAServerError) as info:
        reward(random_images(2))
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"deqa: cannot reach {url} (ConnectionRefusedError")
    assert "reward_options.deqa.url" in message and "$TEMPFLOW_DEQA_REWARD_URL" in message
    assert 'gunicorn "app_deqa:create_app()"' in message


def test_deqa_timeout_is_one_line_naming_the_url():
    with silent_listener() as url:
        reward = load_reward("deqa", url=url, timeout=0.3)
        with pytest.raises(DeQAServerError, match=f"deqa: {url} did not answer 2 images within timeout=0.3 s") as info:
            reward(random_images(2))
    assert "\n" not in str(info.value) and "TEMPFLOW_DEQA_REWARD_URL" in str(info.value)


class Exploit:
    def __reduce__(self):
        return (print, ("a crafted pickle ran code",))


@pytest.mark.parametrize("payload, message", [
    (b"<html>not a pickle</html>", "body is not a plain-data pickle"),
    (pickle.dumps({"scores": [0.5, 0.5]}), r"answer has no key 'outputs' \(keys: \['scores'\]\)"),
    (pickle.dumps({"outputs": [0.5]}), "outputs must be a list of 2 scores \\(one per image\\), got 1 values"),
    (pickle.dumps({"outputs": [0.5, "high"]}), r"outputs\[1\] must be a number, got str"),
    (pickle.dumps([0.5, 0.5]), "answer must be a dict with key 'outputs', got list"),
    (pickle.dumps({"outputs": [Exploit(), 0.5]}), r"body is not a plain-data pickle \(UnpicklingError: refused to "
                                                   r"load global builtins.print"),
])
def test_deqa_malformed_answer_is_one_line(payload, message):
    with fake_server(lambda path, headers, body: (200, payload)) as (url, _):
        with pytest.raises(DeQAServerError, match=f"deqa: {url} sent an unusable answer: {message}") as info:
            load_reward("deqa", url=url)(random_images(2))
    assert "\n" not in str(info.value)


def test_deqa_server_traceback_is_reduced_to_its_exception_line():
    traceback = (b"Traceback (most recent call last):\n  File \"app_deqa.py\", line 35, in inference\n"
                 b"    outputs = INFERENCE_FN(images)\ntorch.OutOfMemoryError: CUDA out of memory\n")
    with fake_server(lambda path, headers, body: (500, traceback)) as (url, recorded):
        with pytest.raises(DeQAServerError) as info:
            load_reward("deqa", url=url)(random_images(2))
    assert str(info.value) == f"deqa: {url} answered HTTP 500: torch.OutOfMemoryError: CUDA out of memory"
    assert len(recorded.requests) == 1  # not retried


def test_deqa_ignores_prompts_and_rejects_bad_options():
    with fake_server(deqa_brightness) as (url, recorded):
        reward = load_reward("deqa", url=url)
        assert not reward.needs_prompts and not reward.differentiable
        reward(grey_images([0.5]), ["a prompt the server never sees"])
    assert b"a prompt the server never sees" not in recorded.requests[0][2]
    with pytest.raises(ValueError, match="deqa: batch_size must be an int >= 1, got 0"):
        load_reward("deqa", batch_size=0)
    with pytest.raises(ValueError, match="deqa: url must look like http://host:port, got '127.0.0.1:18086'"):
        load_reward("deqa", url="127.0.0.1:18086")


# --- OpenAI-compatible chat completions -------------------------------------------------------------

def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), url[:40]
    data = base64.b64decode(url[len(prefix):])
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image


def request_parts(body: bytes) -> tuple[dict, Image.Image, str]:
    """(request JSON, its image, its question text)."""
    request = json.loads(body)
    [message] = request["messages"]
    assert message["role"] == "user"
    image_part, text_part = message["content"]
    assert image_part["type"] == "image_url" and text_part["type"] == "text"
    return request, decode_data_url(image_part["image_url"]["url"]), text_part["text"]


def completion(text: str | None) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "model": "m",
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": text}}]}).encode()


def chat_from(answer_of: Callable[[dict, Image.Image, str], str]):
    """A chat server whose answer comes from the request (JSON, image, question)."""
    def respond(path, headers, body):
        return 200, completion(answer_of(*request_parts(body)))
    return respond


def graded(request, image, text):
    """"Final Score: s" with s = 1 + 4 * brightness, rounded to 0.1: the score says which image it was."""
    return f"The image is fine.\nFinal Score: {1 + 4 * round(brightness(image), 1):.1f}"


def test_unifiedreward_request_matches_upstream():
    x = random_images(2, h=64, w=48)
    prompts = ["a red apple", "two {braces} and a [bracket]"]
    with fake_server(chat_from(lambda r, im, t: "Final Score: 4.5")) as (url, recorded):
        out = load_reward("unifiedreward", url=url + "/v1")(x, prompts)
    assert len(recorded.requests) == 2
    texts = {}
    for path, headers, body in recorded.requests:
        assert path == "/v1/chat/completions"
        assert headers["authorization"] == "Bearer flowgrpo" and headers["content-type"] == "application/json"
        request, image, text = request_parts(body)
        assert request["model"] == "UnifiedReward-7b-v1.5" and request["temperature"] == 0
        assert "max_tokens" not in request  # the server's default, as upstream
        assert image.size == (512, 512) and image.mode == "RGB"
        assert text.startswith("<image>\n") and "Alignment with the Caption" in text and "Overall Image Quality" in text
        assert "score from 1 to 5 after 'Final Score:'." in text
        caption = text.rsplit("Text Caption: ", 1)[1]
        texts[caption] = np.asarray(image)
    assert set(texts) == {"[a red apple]", "[two {braces} and a [bracket]]"}
    # the 512 x 512 PNG is PIL's bicubic resize of the rounded uint8 image, losslessly encoded
    arrays = to_uint8(x)
    expected = np.asarray(Image.fromarray(arrays[0]).resize((512, 512), Image.BICUBIC))
    np.testing.assert_array_equal(texts["[a red apple]"], expected)
    assert out.scores.tolist() == pytest.approx([0.9, 0.9])
    assert out.extras["answer"] == ["Final Score: 4.5"] * 2 and out.extras["score_found"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("answer, score", [
    ("Final Score: 4.5", 0.9),
    ("Reasoning...\nFinal Score:3", 0.6),
    ("Final Score: 5", 1.0),
    ("Final Score: 2.25 (fair)", 0.45),
    ("Final Score: 10", 0.2),  # upstream reads only the first digit
    ("Final Score: 0", None),
    ("Score: 4", None),
    ("", None),
])
def test_unifiedreward_reads_the_final_score(answer, score):
    parsed = parse_final_score(answer)
    assert parsed == (None if score is None else pytest.approx(score))


@pytest.mark.parametrize("answer, score", [
    ("<Thought>sharp</Thought>\n<Score>3</Score>", 0.6),
    ("<Score>5</Score> and later <Score>1</Score>", 1.0),
    ("<Score>7</Score>", 1.4),  # any integer, as upstream
    ("<Score>4.5</Score>", None),
    ("<Score> 4 </Score>", None),
    ("Score: 4", None),
])
def test_qwenvl_reads_the_score_tag(answer, score):
    parsed = parse_score_tag(answer)
    assert parsed == (None if score is None else pytest.approx(score))


def test_a_missing_score_is_zero_and_flagged():
    answers = iter(["I cannot judge this.", "Final Score: 2"])
    lock = threading.Lock()

    def answer(request, image, text):
        with lock:
            return next(answers)

    with fake_server(chat_from(answer)) as (url, _):
        reward = load_reward("unifiedreward", url=url + "/v1", max_concurrency=1)  # sequential: answers in order
        out = reward(grey_images([0.2, 0.4]), ["a", "b"])
    assert out.scores.tolist() == pytest.approx([0.0, 0.4])
    assert out.extras["score_found"].tolist() == [0.0, 1.0]


def test_unifiedreward_keeps_image_order_when_answers_arrive_out_of_order():
    levels = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

    def slow_for_dark(request, image, text):  # the first images answer last
        time.sleep(0.3 * (1 - brightness(image)))
        return graded(request, image, text)

    with fake_server(chat_from(slow_for_dark)) as (url, recorded):
        start = time.monotonic()
        out = load_reward("unifiedreward", url=url + "/v1")(grey_images(levels), [f"p{i}" for i in range(11)])
        elapsed = time.monotonic() - start
    assert elapsed < 1.5  # concurrent: about 0.3 s, not the 1.65 s of one request after the other
    assert out.scores.tolist() == pytest.approx([(1 + 4 * v) / 5 for v in levels])
    captions = [request_parts(body)[2].rsplit("Text Caption: ", 1)[1] for _, _, body in recorded.requests]
    assert sorted(captions) == sorted(f"[p{i}]" for i in range(11))


def test_qwenvl_sends_the_rubric_at_the_images_own_size_without_the_prompt():
    x = random_images(2, h=40, w=56)
    with fake_server(chat_from(lambda r, im, t: "<Thought>ok</Thought>\n<Score>3</Score>")) as (url, recorded):
        reward = load_reward("qwenvl", url=url + "/v1")
        assert not reward.needs_prompts
        out = reward(x, ["a secret prompt", "another"])
    for path, headers, body in recorded.requests:
        assert path == "/v1/chat/completions" and "authorization" not in headers
        request, image, text = request_parts(body)
        assert request["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
        assert request["temperature"] == 0 and request["max_tokens"] == 2048
        assert image.size == (56, 40)
        assert text == RUBRIC and "secret" not in text
        for level in ("1. Bad:", "2. Poor:", "3. Fair:", "4. Good:", "5. Excellent:", "<Thought>", "<Score>X</Score>"):
            assert level in text
    sent = sorted(np.asarray(request_parts(body)[1]).tobytes() for _, _, body in recorded.requests)
    assert sent == sorted(a.tobytes() for a in to_uint8(x))  # lossless PNG of the rounded uint8 images
    assert out.scores.tolist() == pytest.approx([0.6, 0.6])


def test_qwenvl_sends_an_api_key_and_model_when_given():
    with fake_server(chat_from(lambda r, im, t: "<Score>4</Score>")) as (url, recorded):
        reward = load_reward("qwenvl", url=url + "/v1", model="qwen-local", api_key="secret")
        assert reward(grey_images([0.5])).scores.tolist() == pytest.approx([0.8])
    path, headers, body = recorded.requests[0]
    assert headers["authorization"] == "Bearer secret" and json.loads(body)["model"] == "qwen-local"


@pytest.mark.parametrize("name, env, start", [
    ("unifiedreward", "TEMPFLOW_UNIFIEDREWARD_URL", "python -m sglang.launch_server --model-path "
                                                    "CodeGoat24/UnifiedReward-7b-v1.5 --api-key flowgrpo --port 17140"),
    ("qwenvl", "TEMPFLOW_QWENVL_REWARD_URL", "vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 17141"),
])
def test_chat_with_nothing_listening_is_one_line_naming_url_option_env_and_start_command(name, env, start):
    url = closed_port_url("/v1")
    reward = load_reward(name, url=url)
    with pytest.raises(ChatServerError) as info:
        reward(random_images(3), ["a", "b", "c"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{name}: cannot reach {url} (ConnectionRefusedError")
    assert f"reward_options.{name}.url" in message and f"${env}" in message and start in message


def test_chat_timeout_is_one_line_naming_the_endpoint():
    with silent_listener() as url:
        reward = load_reward("qwenvl", url=url + "/v1", timeout=0.3)
        with pytest.raises(ChatServerError, match=f"qwenvl: {url}/v1/chat/completions did not answer within "
                                                  f"timeout=0.3 s") as info:
            reward(random_images(2))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("status, payload, message", [
    (200, b"<html>gateway</html>", "sent an unusable answer: Expecting value"),
    (200, json.dumps({"object": "chat.completion", "choices": []}).encode(),
     r"sent an unusable answer: reply has no choices \(keys: \['choices', 'object'\]\)"),
    (200, json.dumps({"choices": [{"text": "Final Score: 3"}]}).encode(),
     r"sent an unusable answer: reply's choices\[0\] has no message.content"),
    (200, json.dumps({"choices": [{"message": {"content": 3}}]}).encode(),
     r"sent an unusable answer: reply's choices\[0\].message.content must be a string, got int"),
    (401, json.dumps({"error": {"message": "Invalid API key\nplease check"}}).encode(),
     "answered HTTP 401: Invalid API key please check"),
    (404, json.dumps({"object": "error", "message": "The model `x` does not exist."}).encode(),
     "answered HTTP 404: The model `x` does not exist."),
])
def test_chat_malformed_or_refused_answer_is_one_line(status, payload, message):
    with fake_server(lambda path, headers, body: (status, payload)) as (url, _):
        with pytest.raises(ChatServerError, match=f"unifiedreward: {url}/v1/chat/completions {message}") as info:
            load_reward("unifiedreward", url=url + "/v1")(random_images(2), ["a", "b"])
    assert "\n" not in str(info.value)


def test_a_null_content_is_an_answer_without_a_score():
    with fake_server(lambda path, headers, body: (200, completion(None))) as (url, _):
        out = load_reward("qwenvl", url=url + "/v1")(grey_images([0.5]))
    assert out.scores.tolist() == [0.0] and out.extras["answer"] == [""]


# --- registry ---------------------------------------------------------------------------------------

def test_service_rewards_are_in_the_catalogue_with_the_trainers_options(monkeypatch):
    for env in ("TEMPFLOW_DEQA_REWARD_URL", "TEMPFLOW_UNIFIEDREWARD_URL", "TEMPFLOW_QWENVL_REWARD_URL"):
        monkeypatch.delenv(env, raising=False)
    assert CATALOGUE["deqa"] == "deqa:DeQAReward"
    assert CATALOGUE["unifiedreward"] == "unifiedreward:UnifiedRewardReward"
    assert CATALOGUE["qwenvl"] == "qwenvl:QwenVLReward"
    # exactly the options sd35_zeroth_order's reward presets pass
    deqa = load_reward("deqa", url="http://127.0.0.1:18086")
    unified = load_reward("unifiedreward", url="http://127.0.0.1:17140/v1", api_key="flowgrpo",
                          model="UnifiedReward-7b-v1.5")
    qwen = load_reward("qwenvl", url="http://127.0.0.1:17141/v1", model="Qwen/Qwen2.5-VL-7B-Instruct")
    assert (deqa.url, unified.endpoint, qwen.endpoint) == (
        "http://127.0.0.1:18086", "http://127.0.0.1:17140/v1/chat/completions",
        "http://127.0.0.1:17141/v1/chat/completions")
    # the defaults are the same addresses; the environment overrides them
    assert load_reward("unifiedreward").url == unified.url and load_reward("qwenvl").url == qwen.url
    monkeypatch.setenv("TEMPFLOW_QWENVL_REWARD_URL", "http://gpu-node:8000/v1")
    assert load_reward("qwenvl").endpoint == "http://gpu-node:8000/v1/chat/completions"
    for name in ("deqa", "unifiedreward", "qwenvl"):
        assert not load_reward(name).differentiable


@pytest.mark.parametrize("name, option", [("deqa", "api_key"), ("unifiedreward", "urls"), ("qwenvl", "temperature")])
def test_unknown_options_are_refused(name, option):
    with pytest.raises(ValueError, match=f"{name}: unknown option '{option}'; allowed: "):
        load_reward(name, **{option: 1})


@pytest.mark.parametrize("option, value, message", [
    ("max_concurrency", 0, "max_concurrency must be an int >= 1, got 0"),
    ("max_tokens", 0, "max_tokens must be an int >= 1 or None, got 0"),
    ("timeout", -1, "timeout must be a positive number of seconds, got -1"),
    ("model", "", "model must be a non-empty string"),
    ("url", "http://host:port/v1", "url has a bad port"),
])
def test_bad_chat_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=f"unifiedreward: {message}"):
        load_reward("unifiedreward", **{option: value})


def test_a_weighted_mix_logs_each_service_reward():
    with fake_server(deqa_brightness) as (deqa_url, _), fake_server(chat_from(graded)) as (chat_url, _):
        mix = load_reward({"unifiedreward": 1.0, "deqa": 0.0},
                          unifiedreward={"url": chat_url + "/v1"}, deqa={"url": deqa_url})
        out = mix(grey_images([0.0, 1.0]), ["dark", "bright"])
    assert out.scores.tolist() == pytest.approx([0.2, 1.0])
    assert out.extras["deqa"].tolist() == pytest.approx([0.0, 1.0], abs=0.02)
    assert out.extras["unifiedreward/answer"][1].endswith("Final Score: 5.0")
