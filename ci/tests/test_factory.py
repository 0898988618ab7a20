"""The tiny-model cache: build once, rebuild when the builder's source changes, safe across processes."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rsm_testkit.factory as factory
from rsm_testkit import __main__ as cli

CALLS: list[Path] = []


def _counting_builder(out_dir: Path) -> None:
    CALLS.append(out_dir)
    (out_dir / "weights.txt").write_text("tiny\n")


@pytest.fixture
def only_dummy(monkeypatch):
    """A registry holding just the dummy builder (the real ones are never imported or built)."""
    monkeypatch.setattr(factory, "BUILDER_MODULES", ())
    monkeypatch.setattr(factory, "TINY_MODELS", {"dummy": _counting_builder})
    CALLS.clear()


def _write_builder_module(directory: Path, module: str, body: str) -> None:
    """A module that registers a builder `name` writing `body`; its source is what the cache key hashes."""
    (directory / f"{module}.py").write_text(textwrap.dedent(f"""
        import os
        import time
        from pathlib import Path
        from rsm_testkit.factory import tiny_model

        @tiny_model({module!r})
        def build(out_dir: Path) -> None:
            time.sleep(float(os.environ.get("DUMMY_BUILD_SECONDS", "0")))
            with open(out_dir.parent / "build-log.txt", "a") as log:
                log.write("built\\n")
            (out_dir / "weights.txt").write_text({body!r})
    """))


def test_second_get_returns_cached_path_without_rebuilding(only_dummy, tmp_path):
    first = factory.get_tiny_model("dummy", root=tmp_path)
    second = factory.get_tiny_model("dummy", root=tmp_path)
    assert first == second and (first / "weights.txt").read_text() == "tiny\n"
    assert len(CALLS) == 1
    assert first.name.startswith("dummy-")


def test_failed_build_leaves_nothing_behind(only_dummy, tmp_path, monkeypatch):
    def broken(out_dir: Path) -> None:
        (out_dir / "half-written").write_text("x")
        raise RuntimeError("builder failed")

    monkeypatch.setitem(factory.TINY_MODELS, "broken", broken)
    with pytest.raises(RuntimeError, match="builder failed"):
        factory.get_tiny_model("broken", root=tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_changed_builder_source_gives_a_new_key_and_a_new_build(tmp_path, monkeypatch):
    monkeypatch.setattr(factory, "BUILDER_MODULES", ())
    monkeypatch.setattr(factory, "TINY_MODELS", {})
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a same-second rewrite must not hit a stale .pyc
    modules = tmp_path / "modules"
    root = tmp_path / "cache"
    modules.mkdir()
    monkeypatch.syspath_prepend(str(modules))

    _write_builder_module(modules, "dummy_versioned", "v1")
    mod = importlib.import_module("dummy_versioned")
    v1 = factory.get_tiny_model("dummy_versioned", root=root)

    _write_builder_module(modules, "dummy_versioned", "version 2")
    importlib.reload(mod)
    v2 = factory.get_tiny_model("dummy_versioned", root=root)

    assert v1 != v2
    assert (v1 / "weights.txt").read_text() == "v1" and (v2 / "weights.txt").read_text() == "version 2"
    sys.modules.pop("dummy_versioned", None)


def test_two_processes_building_at_once_produce_one_directory(tmp_path):
    modules, root = tmp_path / "modules", tmp_path / "cache"
    modules.mkdir()
    root.mkdir()
    _write_builder_module(modules, "dummy_concurrent", "ok")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(modules)!r})
        import rsm_testkit.factory as factory
        factory.BUILDER_MODULES = ("dummy_concurrent",)
        print(factory.get_tiny_model("dummy_concurrent", root={str(root)!r}))
    """)
    env = {**os.environ, "DUMMY_BUILD_SECONDS": "1.0"}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    built = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert [str(p) for p in built] == list(paths)
    assert (root / "build-log.txt").read_text().count("built") == 1
    assert not [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".")]  # no staging left


def test_unknown_name_raises_keyerror_naming_the_available_models():
    with pytest.raises(KeyError) as err:
        factory.get_tiny_model("no-such-model")
    message = str(err.value)
    assert "no-such-model" in message
    for name in ("sd35", "sd15", "taesd3"):
        assert name in message


def test_build_all_and_cli_build_every_registered_model(only_dummy, tmp_path, monkeypatch, capsys):
    assert factory.build_all(tmp_path / "a") == {"dummy": factory.get_tiny_model("dummy", tmp_path / "a")}

    monkeypatch.setenv("RSM_TINY_MODELS", str(tmp_path / "b"))
    assert cli.main(["build"]) == 0
    out = capsys.readouterr().out
    assert "dummy" in out and str(tmp_path / "b") in out
    assert len(list((tmp_path / "b").glob("dummy-*"))) == 1


def test_cache_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RSM_TINY_MODELS", str(tmp_path))
    assert factory.cache_root() == tmp_path
    monkeypatch.delenv("RSM_TINY_MODELS")
    monkeypatch.setattr(factory, "_CHECKOUT", tmp_path / "not-a-checkout")  # an installed, non-editable kit
    assert factory.cache_root() == Path.home() / ".cache" / "rsm_tiny_models"


def test_without_the_environment_variable_a_checkout_uses_its_own_cache_folder(monkeypatch):
    """One cache: `make` exports <repo>/.cache/tiny_models, and a launcher's --tiny started without that
    variable (a user's shell) lands in the same folder instead of building a second cache under ~/.cache."""
    monkeypatch.delenv("RSM_TINY_MODELS", raising=False)
    repo = Path(factory.__file__).resolve().parents[2]
    assert factory.cache_root() == repo / ".cache" / "tiny_models"
    make = (repo / "Makefile").read_text()
    assert "RSM_TINY_MODELS ?= $(CURDIR)/.cache/tiny_models" in make


def test_cached_artifact_is_built_once_per_key(tmp_path):
    built = []

    def build(out_dir: Path) -> None:
        built.append(out_dir)
        (out_dir / "data.txt").write_text("x")

    first = factory.cached_artifact("emb", ["code v1", "model-abc"], build, root=tmp_path)
    assert factory.cached_artifact("emb", ["code v1", "model-abc"], build, root=tmp_path) == first
    other = factory.cached_artifact("emb", ["code v2", "model-abc"], build, root=tmp_path)
    assert other != first and len(built) == 2 and (other / "data.txt").read_text() == "x"


def test_tiny_prompt_sets_have_the_fetch_data_layout_and_valid_geneval_metadata():
    import json

    from shared_rewards.geneval.metadata import validate_metadata

    root = factory.get_tiny_model("prompt_sets")
    for name, files in {"pickscore": ["train.txt", "test.txt"], "ocr": ["train.txt", "test.txt"],
                        "hpsv2": ["train.txt", "test.txt"], "geneval": ["train_metadata.jsonl", "test_metadata.jsonl"],
                        "dancegrpo": ["prompts.txt"], "drawbench": ["drawbench.json"]}.items():
        for file in files:
            assert (root / name / file).read_text().strip(), (name, file)
    for line in (root / "geneval" / "train_metadata.jsonl").read_text().splitlines():
        validate_metadata(json.loads(line))
    assert all('"' in line for line in (root / "ocr" / "train.txt").read_text().splitlines())  # text to render
