"""What the clients of reward servers (deqa, the chat-completions rewards, geneval) share: where the server
is (`resolve_service_url`) and, for the clients on urllib, one POST whose every failure is a one-line error of
the caller's own type (`post_bytes`).

Failures split the way a user acts on them: an HTTP error status means the server is there and said no, so
the line gives the server's reason; nothing listening, no answer in time or a dropped connection means the
user must point the reward elsewhere or start (or wait for) the server, so the caller adds how.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Callable, Sequence
from urllib.parse import urlsplit


def one_line(text: str, limit: int = 300) -> str:
    """`text` with its whitespace runs (newlines included) collapsed to single spaces, at most `limit` chars."""
    return " ".join(text.split())[:limit]


def resolve_service_url(reward: str, url: str | None, env_vars: str | Sequence[str], default: str) -> str:
    """The option, else the first non-empty of the environment variables `env_vars`, else the default;
    without trailing '/'. It must look like http(s)://host[:port][/path]; a ValueError names `reward`."""
    if url is None:
        names = (env_vars,) if isinstance(env_vars, str) else tuple(env_vars)
        url = next((os.environ[name] for name in names if os.environ.get(name)), default)
    url = str(url).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{reward}: url must look like http://host:port, got {url!r}")
    try:
        parts.port  # urlsplit parses lazily: a non-numeric or out-of-range port only fails here
    except ValueError:
        raise ValueError(f"{reward}: url has a bad port: {url!r}") from None
    return url


def post_bytes(url: str, body: bytes, headers: dict[str, str], timeout: float, *,
               refused: Callable[[str], Exception], unreachable: Callable[[str], Exception],
               server_reason: Callable[[bytes], str], server_url: str | None = None, load: str = "",
               remedy: str = "raise timeout") -> bytes:
    """POSTs `body` to `url` and returns the answer's bytes, waiting at most `timeout` s for it.

    An HTTP error status raises refused("<url> answered HTTP <code>: <server_reason(error body) or the status
    text>"). The other failures raise unreachable(<what happened>): "cannot reach <server_url> (...)" when
    nothing listens (refused, unknown host, connect timeout; `server_url` defaults to `url`), "<url> did not
    answer[ <load>] within timeout=<t> s (<remedy> if the server is only slow)", or "<url> dropped the
    connection (...)". The caller's exception is raised `from None`: the message is the whole story.
    """
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    # order matters: HTTPError is a URLError, and URLError and TimeoutError are OSErrors
    except urllib.error.HTTPError as exc:
        raise refused(f"{url} answered HTTP {exc.code}: {server_reason(exc.read()) or exc.reason}") from None
    except urllib.error.URLError as exc:  # refused, unknown host, connect timeout
        reason = exc.reason
        detail = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
        raise unreachable(f"cannot reach {server_url or url} ({one_line(detail)})") from None
    except TimeoutError:  # connected, but the answer did not come in time
        waited_for = f" {load}" if load else ""
        raise unreachable(f"{url} did not answer{waited_for} within timeout={timeout:g} s "
                          f"({remedy} if the server is only slow)") from None
    except OSError as exc:  # the connection was closed or reset before an answer
        raise unreachable(f"{url} dropped the connection ({type(exc).__name__}: {one_line(str(exc))})") from None
