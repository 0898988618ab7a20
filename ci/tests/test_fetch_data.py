"""scripts/fetch_data.py against local mirrors laid out like the upstream sources (no network in tests): a
folder, a loopback HTTP server, a closed loopback port and an opener that fails as an offline machine's does."""
import contextlib
import functools
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_data.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60)


def load_script():
    namespace = {"__file__": str(SCRIPT), "__name__": "fetch_data"}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), namespace)
    return namespace


def load_sources():
    return load_script()["SOURCES"]


def make_mirror(root: Path, sets, skip=()):
    sources = load_sources()
    for name in sets:
        for dest, path in sources[name]:
            if f"{name}/{dest}" in skip:
                continue
            f = root / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(f"{name}/{dest}\n")
    return sources


def everything_under(path: Path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")) if path.exists() else []


def test_fetches_every_file_of_the_chosen_sets_from_a_mirror(tmp_path):
    sources = make_mirror(tmp_path / "mirror", ["hpsv2", "geneval"])
    proc = run("--out", tmp_path / "data", "--only", "hpsv2", "geneval", "--source-root", tmp_path / "mirror")
    assert proc.returncode == 0, proc.stderr
    umask = os.umask(0)
    os.umask(umask)
    for name in ("hpsv2", "geneval"):
        assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o777 & ~umask
        for dest, _ in sources[name]:
            assert (tmp_path / "data" / name / dest).read_text() == f"{name}/{dest}\n"
            assert (tmp_path / "data" / name / dest).stat().st_mode & 0o777 == 0o666 & ~umask
    assert everything_under(tmp_path / "data") == sorted(
        [*(f"{n}/{d}" for n in ("hpsv2", "geneval") for d, _ in sources[n]), "hpsv2", "geneval"])


def test_existing_files_are_kept_unless_forced(tmp_path):
    make_mirror(tmp_path / "mirror", ["drawbench"])
    out = tmp_path / "data" / "drawbench" / "drawbench.json"
    out.parent.mkdir(parents=True)
    out.write_text("mine")
    assert run("--out", tmp_path / "data", "--only", "drawbench", "--source-root", tmp_path / "mirror").returncode == 0
    assert out.read_text() == "mine"
    run("--out", tmp_path / "data", "--only", "drawbench", "--source-root", tmp_path / "mirror", "--force")
    assert out.read_text() == "drawbench/drawbench.json\n"


def test_a_missing_source_fails_with_its_url_and_leaves_no_file_or_folder(tmp_path):
    (tmp_path / "mirror").mkdir()
    proc = run("--out", tmp_path / "data", "--only", "ocr", "--source-root", tmp_path / "mirror")
    assert proc.returncode == 1
    assert "could not be fetched" in proc.stderr and "ocr/train.txt" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_a_mirror_folder_that_does_not_exist_is_one_line_before_anything_is_written(tmp_path):
    proc = run("--out", tmp_path / "data", "--source-root", tmp_path / "nowhere")
    assert proc.returncode == 2 and not (tmp_path / "data").exists()
    assert proc.stderr == f"fetch_data: --source-root {tmp_path / 'nowhere'} is not a folder; a mirror holds each " \
                          f"file at its upstream path (--list prints them)\n"


def test_a_set_missing_one_file_is_not_written_and_the_complete_sets_are(tmp_path):
    make_mirror(tmp_path / "mirror", ["drawbench", "ocr"], skip={"ocr/test.txt"})
    proc = run("--out", tmp_path / "data", "--only", "drawbench", "ocr", "--source-root", tmp_path / "mirror")
    assert proc.returncode == 1
    assert "ocr/test.txt" in proc.stderr and "skipped" in proc.stderr and "offline" not in proc.stderr
    assert everything_under(tmp_path / "data") == ["drawbench", "drawbench/drawbench.json"]


class QuietMirror(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_mirror(root: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietMirror, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_404_from_a_reachable_host_skips_that_set_only(tmp_path):
    make_mirror(tmp_path / "mirror", ["drawbench", "ocr"], skip={"ocr/train.txt"})
    with http_mirror(tmp_path / "mirror") as url:
        proc = run("--out", tmp_path / "data", "--only", "drawbench", "ocr", "--source-root", url)
    assert proc.returncode == 1
    assert "HTTPError: HTTP Error 404" in proc.stderr and "offline" not in proc.stderr
    assert everything_under(tmp_path / "data") == ["drawbench", "drawbench/drawbench.json"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: connections to it are refused


def test_an_unreachable_source_stops_at_the_first_file_with_one_message_and_no_folder(tmp_path):
    root = f"http://127.0.0.1:{closed_port()}"
    out = tmp_path / "new" / "data"
    start = time.monotonic()
    proc = run("--out", out, "--source-root", root)  # every set: 17 files
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("fetch_data: cannot reach 127.0.0.1:") and "ConnectionRefusedError" in lines[0]
    assert "so nothing more was tried (nothing was written)" in lines[0]
    assert proc.stderr.count("cannot reach") == 1 and "FAILED" not in proc.stderr
    assert any(line.strip().endswith(f"--out {out} --source-root <mirror>") for line in lines)
    assert not (tmp_path / "new").exists()  # the folders it would have created are gone too


def test_offline_keeps_the_sets_already_complete_and_names_the_mirror_command(tmp_path, monkeypatch, capsys):
    script = load_script()
    requested = []

    def offline_after_two_sets(url, timeout):
        requested.append(url)
        if "geneval/test_metadata" in url:  # the second file of the third set
            raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))
        return io.BytesIO(f"from {url}\n".encode())

    monkeypatch.setattr(urllib.request, "urlopen", offline_after_two_sets)
    out = tmp_path / "data"
    assert script["main"](["--out", str(out)]) == 1
    # sets in order: dancegrpo (1 file), drawbench (1), geneval (1 fetched, then the failure); no request after
    assert len(requested) == 4 and requested[-1].startswith(script["RAW"])
    assert everything_under(out) == ["dancegrpo", "dancegrpo/prompts.txt", "drawbench", "drawbench/drawbench.json"]
    err = capsys.readouterr().err
    assert err.startswith("fetch_data: cannot reach raw.githubusercontent.com for geneval/test_metadata.jsonl "
                          "(gaierror: [Errno -3] Temporary failure in name resolution); this machine seems offline")
    assert "(complete and kept: dancegrpo, drawbench)" in err
    assert f"--out {out} --source-root <mirror>\n" in err
    geneval_test = dict(script["SOURCES"]["geneval"])["test_metadata.jsonl"]
    assert f"<mirror>/{geneval_test};" in err and "--list" in err


def test_list_prints_the_path_of_each_file_under_the_source_root(tmp_path):
    sources = load_sources()
    proc = run("--list", "--only", "ocr", "drawbench")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [f"{n}/{d}  {p}" for n in ("ocr", "drawbench") for d, p in sources[n]]
