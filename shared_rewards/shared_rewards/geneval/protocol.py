"""The upstream GenEval reward-server wire format (yifan123/reward-server), made safe to parse.

Request: POST `/` whose body is `pickle.dumps({"images": [JPEG bytes], "meta_datas": [dict],
"only_strict": bool})`; response body: `pickle.dumps({"scores", "rewards", "strict_rewards",
"group_rewards", "group_strict_rewards"})`. No Content-Type is set or checked (spec B.9).

Pickle over HTTP runs arbitrary code for whoever can reach the port, so both ends unpickle with
`safe_loads`: plain containers and scalars only, no global is ever looked up.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Sequence

import numpy as np
from PIL import Image, JpegImagePlugin

from .vocabulary import TAGS

REQUEST_KEYS = ("images", "meta_datas", "only_strict")
RESPONSE_KEYS = ("scores", "rewards", "strict_rewards", "group_rewards", "group_strict_rewards")
JPEG_QUALITY = 75  # PIL's default, which the upstream clients use
# Pixel limits, checked from the JPEG headers before anything is decoded. The detector's mask post-processing
# holds about four float32 [100 queries, H, W] tensors of one image (~1.7 kB per pixel), and a request's images
# stay decoded as uint8 RGB (3 B per pixel). Training posts chunks of 64 images of 512 x 512 (16 MP), evaluation
# up to 64 of 1024 x 1024 (64 MP); the defaults admit twice the largest of each, so one image's masks stay under
# ~3.6 GB (2 MP) and a request's decoded pixels under ~400 MB (128 MP), where one 1 MB JPEG of 8000 x 8000
# (64 MP) would ask the detector for 25.6 GB.
MAX_IMAGE_PIXELS = 2 * 1024 * 1024
MAX_REQUEST_PIXELS = 128 * 1024 * 1024


class ProtocolError(ValueError):
    """A request or response that does not follow the wire format; the message is one line."""


class PixelLimitError(ProtocolError):
    """An image, or a request's images together, with more pixels than the server decodes (HTTP 413)."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every global: dict/list/tuple/str/bytes/int/float/bool/None have their own opcodes, so
    honest payloads need none, while every code-execution trick (`__reduce__` to os.system, eval, ...)
    has to name one."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load global {module}.{name} (only plain data is accepted)")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id (only plain data is accepted)")


def safe_loads(data: bytes) -> Any:
    """pickle.loads restricted to plain data. Raises ProtocolError on anything else or on garbage."""
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except Exception as exc:  # truncated streams raise EOFError, bad opcodes UnpicklingError/ValueError/...
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise ProtocolError(f"body is not a plain-data pickle ({type(exc).__name__}: {text})"[:300]) from None


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """[H, W, 3] uint8 RGB -> JPEG bytes, as the upstream client writes them (PIL, default quality 75)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _open_jpeg(data: Any, index: int) -> JpegImagePlugin.JpegImageFile:
    """Reads only the JPEG header: size and mode are known, no pixel is decoded yet. JpegImageFile directly,
    not Image.open, whose decompression-bomb check would refuse a huge header before our limit could name it."""
    if not isinstance(data, (bytes, bytearray)):
        raise ProtocolError(f"images[{index}] must be JPEG bytes, got {type(data).__name__}")
    try:
        return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    except Exception as exc:  # not a JPEG (SyntaxError), a broken header (OSError, struct.error, ...)
        raise ProtocolError(f"images[{index}] is not a decodable JPEG ({type(exc).__name__})") from None


def _decode(image: JpegImagePlugin.JpegImageFile, index: int) -> np.ndarray:
    try:
        with image:
            return np.array(image.convert("RGB"))  # [H, W, 3] uint8, writable
    except Exception as exc:  # truncated or corrupt scan data
        raise ProtocolError(f"images[{index}] is not a decodable JPEG ({type(exc).__name__})") from None


def decode_jpeg(data: Any, index: int, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """JPEG bytes -> [H, W, 3] uint8 RGB. Only JPEG is opened (as upstream: PNG bytes fail); an image over
    `max_pixels` is refused from its header with PixelLimitError."""
    return decode_jpegs([data], max_pixels, max_pixels, first_index=index)[0]


def decode_jpegs(images: Sequence[Any], max_image_pixels: int = MAX_IMAGE_PIXELS,
                 max_request_pixels: int = MAX_REQUEST_PIXELS, first_index: int = 0) -> list[np.ndarray]:
    """A request's JPEG bytes -> [H, W, 3] uint8 RGB arrays. Every header is read and both pixel limits are
    checked before the first image is decoded, so a refused request costs no pixel memory."""
    opened = [_open_jpeg(data, first_index + i) for i, data in enumerate(images)]
    total = 0
    for i, image in enumerate(opened):
        width, height = image.size
        if width * height > max_image_pixels:
            raise PixelLimitError(f"images[{first_index + i}] is {width}x{height} = {width * height} pixels, over "
                                  f"the per-image limit of {max_image_pixels} pixels (server option "
                                  f"--max-image-pixels)")
        total += width * height
    if total > max_request_pixels:
        raise PixelLimitError(f"the request's {len(opened)} images have {total} pixels in all, over the per-request "
                              f"limit of {max_request_pixels} pixels (server option --max-request-pixels); send "
                              f"fewer images per request")
    return [_decode(image, first_index + i) for i, image in enumerate(opened)]


def parse_request(body: bytes) -> tuple[list[Any], list[Any], bool]:
    """Checks the request's shape (not the metadata schema, nor the image bytes) and returns
    (images, meta_datas, only_strict)."""
    request = safe_loads(body)
    if not isinstance(request, dict):
        raise ProtocolError(f"request must be a dict with keys {list(REQUEST_KEYS)}, got {type(request).__name__}")
    missing = [k for k in REQUEST_KEYS if k not in request]
    if missing:
        raise ProtocolError(f"request is missing key(s) {missing}; expected {list(REQUEST_KEYS)}")
    extra = [k for k in request if k not in REQUEST_KEYS]
    if extra:
        raise ProtocolError(f"request has unexpected key(s) {[repr(k) for k in extra]}; expected {list(REQUEST_KEYS)}")
    images, metadatas, only_strict = (request[k] for k in REQUEST_KEYS)
    for key, value in (("images", images), ("meta_datas", metadatas)):
        if not isinstance(value, (list, tuple)):
            raise ProtocolError(f"{key} must be a list, got {type(value).__name__}")
    if not isinstance(only_strict, bool):
        raise ProtocolError(f"only_strict must be a bool, got {type(only_strict).__name__}")
    if len(images) != len(metadatas):
        raise ProtocolError(f"got {len(images)} images but {len(metadatas)} meta_datas")
    if not images:
        raise ProtocolError("images is empty")
    for i, md in enumerate(metadatas):
        if not isinstance(md, dict):
            raise ProtocolError(f"meta_datas[{i}] must be a dict, got {type(md).__name__}")
    return list(images), list(metadatas), only_strict


def encode_request(jpegs: Sequence[bytes], metadatas: Sequence[dict], only_strict: bool) -> bytes:
    return pickle.dumps({"images": list(jpegs), "meta_datas": list(metadatas), "only_strict": bool(only_strict)})


def check_response(response: Any, batch: int) -> dict:
    """The server's answer must have every upstream key, each list (and each tag's list) of length `batch`."""
    if not isinstance(response, dict):
        raise ProtocolError(f"response must be a dict, got {type(response).__name__}")
    missing = [k for k in RESPONSE_KEYS if k not in response]
    if missing:
        raise ProtocolError(f"response is missing key(s) {missing}")
    for key in RESPONSE_KEYS[:3]:
        values = response[key]
        if not isinstance(values, list) or len(values) != batch:
            got = len(values) if isinstance(values, list) else type(values).__name__
            raise ProtocolError(f"response {key!r} must be a list of {batch} numbers, got {got}")
    for key in RESPONSE_KEYS[3:]:
        groups = response[key]
        if not isinstance(groups, dict) or set(groups) != set(TAGS):
            got = sorted(groups) if isinstance(groups, dict) else type(groups).__name__
            raise ProtocolError(f"response {key!r} must map the six tags {list(TAGS)} to lists, got {got}")
        for tag, values in groups.items():
            if not isinstance(values, list) or len(values) != batch:
                raise ProtocolError(f"response {key}[{tag!r}] must be a list of {batch} numbers")
    return response
