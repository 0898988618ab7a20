"""Fetches the two prompt lists of this component's presets that `scripts/fetch_data.py` does not: upstream's
`simple_animals.txt` (45 names; preset `aesthetic.py`) and `imagenet_classes.txt` (1000 classes; the imagenet_*
prompt functions), from the pinned upstream commit into `<repo>/data/sd35_first_order/`, where the prompt functions
look for them.

    python sd35_first_order/scripts/fetch_assets.py                     # -> <repo>/data/sd35_first_order/
    python sd35_first_order/scripts/fetch_assets.py --source-root <mirror>   # offline: a folder laid out like upstream

It runs fetch_data.py's own machinery (staging folder, all-or-nothing, the offline message) with this one set added.
"""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SET = "sd35_first_order"


def main(argv=None):
    spec = importlib.util.spec_from_file_location("fetch_data", REPO / "scripts" / "fetch_data.py")
    fetch_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch_data)
    assets = f"{fetch_data.RSM}/sd35_first_order/lib/assets"
    fetch_data.SOURCES[SET] = [("simple_animals.txt", f"{assets}/simple_animals.txt"),
                               ("imagenet_classes.txt", f"{assets}/imagenet_classes.txt")]
    script = str(Path(__file__).resolve())
    fetch_data.command = lambda out, only: f"python {script} --out {out} --source-root <mirror>"
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--out" not in argv:
        argv = ["--out", str(REPO / "data"), *argv]
    return fetch_data.main([*argv, "--only", SET])


if __name__ == "__main__":
    sys.exit(main())
