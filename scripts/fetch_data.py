"""Fetches the prompt sets the paper runs train and evaluate on, from their public upstream sources.

    python scripts/fetch_data.py --out data                       # everything
    python scripts/fetch_data.py --out data --only geneval hpsv2  # some sets
    python scripts/fetch_data.py --out data --source-root /path/to/mirror   # an offline copy, same layout
    python scripts/fetch_data.py --list                           # the paths such a mirror must hold

Files land under `<out>/<set>/`, e.g. data/geneval/train_metadata.jsonl. Sources are pinned to the commits
the paper code was read at, so every user trains on the same prompts. GenEval's training metadata is the
file the RSM/Flow-GRPO repositories ship (generated from the benchmark templates with other seeds); to make
a fresh one with our own generator instead, see `python -m shared_rewards.geneval.prompts --help`.

A set is written whole or not at all: its files are fetched into a hidden folder beside it and moved in
together. When the source host cannot be reached (an offline machine) the script stops at the first
failure and prints the --source-root command to use instead.
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

RAW = "https://raw.githubusercontent.com"
RSM = "jaylee2000/rsm/e8be3df6a5f86a57981b64130c9a5c1cdeef9071"  # the paper's code (HEAD read for the specs)
GENEVAL = "djghosh13/geneval/main"

# set -> [(destination inside <out>/<set>/, path under the source root)]
SOURCES: dict[str, list[tuple[str, str]]] = {
    "geneval": [
        ("train_metadata.jsonl", f"{RSM}/sd35_zeroth_order/dataset/geneval/train_metadata.jsonl"),
        ("test_metadata.jsonl", f"{RSM}/sd35_zeroth_order/dataset/geneval/test_metadata.jsonl"),
        ("evaluation_metadata.jsonl", f"{GENEVAL}/prompts/evaluation_metadata.jsonl"),
        ("object_names.txt", f"{GENEVAL}/prompts/object_names.txt"),
        ("train_prompts.txt", f"{RSM}/sd15_first_order/utils/assets/geneval_train_prompts.txt"),
    ],
    "hpsv2": [
        ("train.txt", f"{RSM}/sd35_zeroth_order/dataset/hpsv2/train.txt"),
        ("test.txt", f"{RSM}/sd35_zeroth_order/dataset/hpsv2/test.txt"),
    ],
    "pickscore": [
        ("train.txt", f"{RSM}/sd35_zeroth_order/dataset/pickscore/train.txt"),
        ("test.txt", f"{RSM}/sd35_zeroth_order/dataset/pickscore/test.txt"),
    ],
    "ocr": [
        ("train.txt", f"{RSM}/sd35_zeroth_order/dataset/ocr/train.txt"),
        ("test.txt", f"{RSM}/sd35_zeroth_order/dataset/ocr/test.txt"),
    ],
    "dancegrpo": [("prompts.txt", f"{RSM}/sd15_zeroth_order/prompts_dancegrpo.txt")],
    "hpdv2": [(f"benchmark_{style}.json", f"{RSM}/sd35_first_order/lib/assets/HPDv2/benchmark_{style}.json")
              for style in ("anime", "concept-art", "paintings", "photo")],
    "drawbench": [("drawbench.json", f"{RSM}/sd35_first_order/lib/assets/drawbench.json")],
}


def source_url(root: str, path: str) -> str:
    """`root` is a URL prefix or a local directory laid out like it."""
    if "://" in root:
        return f"{root.rstrip('/')}/{path}"
    return Path(root).expanduser().resolve().joinpath(path).as_uri()


def is_remote(root: str) -> bool:
    return urlsplit(root).scheme in ("http", "https")


class Unreachable(OSError):
    """No answer came from the source (no route, DNS, refused, timed out, connection dropped), as opposed
    to an answer that says no (HTTPError) or a local disk error."""


def _why(exc: BaseException) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc  # URLError wraps the socket error
    return f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)


def download(url: str, dest: Path, timeout: float) -> int:
    """Writes `url` to `dest` (inside a set's staging folder, so a partial file never reaches the set)."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        raise
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise Unreachable(_why(exc)) from None
    size = 0
    with response, open(dest, "wb") as f:
        while True:
            try:
                chunk = response.read(1 << 20)
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(_why(exc)) from None
            if not chunk:
                break
            f.write(chunk)
            size += len(chunk)
    if size == 0:
        raise ValueError(f"{url} is empty")
    return size


class Offline(Exception):
    def __init__(self, what: str, url: str, path: str, reason: str):
        super().__init__(f"{what}: {url}: {reason}")
        self.what, self.url, self.path, self.reason = what, url, path, reason


def fetch_set(name: str, out: Path, root: str, timeout: float, force: bool) -> list[str]:
    """Fetches the set's missing files and moves them into `<out>/<name>/` only when every one arrived.
    Returns the failures; raises Offline at the first file a remote source did not answer for."""
    set_dir = out / name
    todo = []
    for dest_name, path in SOURCES[name]:
        if (set_dir / dest_name).is_file() and not force:
            print(f"kept     {set_dir / dest_name}")
        else:
            todo.append((dest_name, path))
    if not todo:
        return []
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f".{name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the set folder's mode
    failures, sizes = [], {}
    try:
        for dest_name, path in todo:
            url = source_url(root, path)
            try:
                sizes[dest_name] = download(url, staging / dest_name, timeout)
                continue
            except Unreachable as exc:
                if is_remote(root):  # every other file would wait for the same silence
                    raise Offline(f"{name}/{dest_name}", url, path, str(exc)) from None
                failure = f"{set_dir / dest_name}: {url}: {exc}"  # a local mirror without the file
            except Exception as exc:  # an HTTP error status, an empty file, a full disk: this set only
                failure = f"{set_dir / dest_name}: {url}: {type(exc).__name__}: {exc}"
            failures.append(failure)
            print(f"FAILED   {failure}", file=sys.stderr)
        if failures:
            print(f"skipped  {set_dir}: {len(failures)} of its {len(todo)} file(s) missing, none of it written",
                  file=sys.stderr)
            return failures
        for path in staging.iterdir():
            path.chmod(0o666 & ~umask)
        if set_dir.exists():
            for dest_name, _ in todo:
                (staging / dest_name).replace(set_dir / dest_name)
        else:
            staging.rename(set_dir)  # the whole set appears at once
        for dest_name, _ in todo:
            print(f"fetched  {set_dir / dest_name} ({sizes[dest_name] / 1e3:.1f} kB)")
        return []
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet (what this run would create), or None."""
    path = path.absolute()
    missing = None
    while not path.exists():
        missing, path = path, path.parent
    return missing


def remove_if_empty(path: Path, up_to: Path | None) -> None:
    """Removes `path` and its parents up to `up_to` (folders this run created) while they are empty."""
    if up_to is None:
        return
    path = path.absolute()
    while True:
        try:
            path.rmdir()
        except OSError:  # not empty, or already gone
            return
        if path == up_to:
            return
        path = path.parent


def command(out: str, only: list[str] | None) -> str:
    script = os.path.relpath(Path(__file__).resolve())
    script = script if not script.startswith("..") else str(Path(__file__).resolve())
    return " ".join(["python", script, "--out", out, *(["--only", *only] if only else []),
                     "--source-root", "<mirror>"])


def offline_message(exc: Offline, args: argparse.Namespace, done: list[str]) -> str:
    host = urlsplit(exc.url).netloc
    seems = "this machine seems offline" if args.source_root == RAW else f"{host} is down or this machine offline"
    kept = f"complete and kept: {', '.join(done)}" if done else "nothing was written"
    return "\n".join([
        f"fetch_data: cannot reach {host} for {exc.what} ({exc.reason}); {seems}, so nothing more was tried "
        f"({kept}).",
        "Fetch from a mirror instead, a folder (or URL prefix) that holds each file at its upstream path, copied "
        "from a machine with network:",
        f"    {command(args.out, args.only)}",
        f"e.g. this file at <mirror>/{exc.path}; `--list` prints every path the chosen sets need.",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="destination directory (default: ./data)")
    parser.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="sets to fetch (default: all)")
    parser.add_argument("--source-root", default=RAW, help="URL prefix or local mirror directory")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    parser.add_argument("--force", action="store_true", help="fetch again files that are already there")
    parser.add_argument("--list", action="store_true",
                        help="print where each file of the chosen sets lies under --source-root (the layout a "
                             "mirror needs) and exit")
    args = parser.parse_args(argv)
    sets = args.only or sorted(SOURCES)
    if args.list:
        for name in sets:
            for dest_name, path in SOURCES[name]:
                print(f"{name}/{dest_name}  {path}")
        return 0

    if "://" not in args.source_root and not Path(args.source_root).expanduser().is_dir():
        print(f"fetch_data: --source-root {args.source_root} is not a folder; a mirror holds each file at its "
              f"upstream path (--list prints them)", file=sys.stderr)
        return 2
    out = Path(args.out)
    created = first_missing(out)
    failures, done = [], []
    try:
        for name in sets:
            try:
                set_failures = fetch_set(name, out, args.source_root, args.timeout, args.force)
            except Offline as exc:
                print(offline_message(exc, args, done), file=sys.stderr)
                return 1
            failures += set_failures
            done += [] if set_failures else [name]
    finally:
        remove_if_empty(out, created)
    if failures:
        print(f"{len(failures)} file(s) could not be fetched; first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
