"""scripts/fetch_data.py against a local mirror laid out like the upstream sources (no network in tests)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_data.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def load_sources():
    namespace = {}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), namespace)
    return namespace["SOURCES"]


def make_mirror(root: Path, sets):
    sources = load_sources()
    for name in sets:
        for dest, path in sources[name]:
            f = root / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"{name}/{dest}\n")
    return sources


def test_fetches_every_file_of_the_chosen_sets_from_a_mirror(tmp_path):
    sources = make_mirror(tmp_path / "mirror", ["hpsv2", "geneval"])
    proc = run("--out", tmp_path / "data", "--only", "hpsv2", "geneval", "--source-root", tmp_path / "mirror")
    assert proc.returncode == 0, proc.stderr
    for name in ("hpsv2", "geneval"):
        for dest, _ in sources[name]:
            assert (tmp_path / "data" / name / dest).read_text() == f"{name}/{dest}\n"
    assert not (tmp_path / "data" / "ocr").exists()


def test_existing_files_are_kept_unless_forced(tmp_path):
    make_mirror(tmp_path / "mirror", ["drawbench"])
    out = tmp_path / "data" / "drawbench" / "drawbench.json"
    out.parent.mkdir(parents=True)
    out.write_text("mine")
    assert run("--out", tmp_path / "data", "--only", "drawbench", "--source-root", tmp_path / "mirror").returncode == 0
    assert out.read_text() == "mine"
    run("--out", tmp_path / "data", "--only", "drawbench", "--source-root", tmp_path / "mirror", "--force")
    assert out.read_text() == "drawbench/drawbench.json\n"


def test_a_missing_source_fails_with_its_url_and_leaves_no_partial_file(tmp_path):
    (tmp_path / "mirror").mkdir()
    proc = run("--out", tmp_path / "data", "--only", "ocr", "--source-root", tmp_path / "mirror")
    assert proc.returncode == 1
    assert "could not be fetched" in proc.stderr and "ocr/train.txt" in proc.stderr
    leftovers = list((tmp_path / "data").rglob("*")) if (tmp_path / "data").exists() else []
    assert not [p for p in leftovers if p.is_file()]
