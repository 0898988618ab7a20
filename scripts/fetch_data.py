"""Fetches the prompt sets the paper runs train and evaluate on, from their public upstream sources.

    python scripts/fetch_data.py --out data                       # everything
    python scripts/fetch_data.py --out data --only geneval hpsv2  # some sets
    python scripts/fetch_data.py --out data --source-root /path/to/mirror   # an offline copy, same layout

Files land under `<out>/<set>/`, e.g. data/geneval/train_metadata.jsonl. Sources are pinned to the commits
the paper code was read at, so every user trains on the same prompts. GenEval's training metadata is the
file the RSM/Flow-GRPO repositories ship (generated from the benchmark templates with other seeds); to make
a fresh one with our own generator instead, see `python -m shared_rewards.geneval.prompts --help`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

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


def download(url: str, dest: Path, timeout: float) -> int:
    """Writes through a temporary file, so an interrupted download never leaves a truncated set behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                shutil.copyfileobj(response, tmp)
            tmp.flush()
            size = tmp.tell()
        except BaseException:
            Path(tmp.name).unlink(missing_ok=True)
            raise
    if size == 0:
        Path(tmp.name).unlink(missing_ok=True)
        raise OSError(f"{url} is empty")
    Path(tmp.name).replace(dest)
    return size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data", help="destination directory (default: ./data)")
    parser.add_argument("--only", nargs="+", choices=sorted(SOURCES), help="sets to fetch (default: all)")
    parser.add_argument("--source-root", default=RAW, help="URL prefix or local mirror directory")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per file")
    parser.add_argument("--force", action="store_true", help="fetch again files that are already there")
    args = parser.parse_args(argv)

    failures = []
    for name in args.only or sorted(SOURCES):
        for dest_name, path in SOURCES[name]:
            dest = Path(args.out) / name / dest_name
            if dest.is_file() and not args.force:
                print(f"kept     {dest}")
                continue
            url = source_url(args.source_root, path)
            try:
                size = download(url, dest, args.timeout)
                print(f"fetched  {dest} ({size / 1e3:.1f} kB)")
            except Exception as exc:  # keep going: one missing set should not stop the others
                failures.append(f"{dest}: {url}: {type(exc).__name__}: {exc}")
                print(f"FAILED   {dest}: {type(exc).__name__}: {exc}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} file(s) could not be fetched; first: {failures[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
