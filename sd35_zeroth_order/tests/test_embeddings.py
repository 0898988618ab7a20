"""Prompt-embedding precompute, HDF5 layout and dataset (spec §6.1-6.3, §1.3; §9 item 34), with the tiny
SD3.5 pipeline's real text encoders (CLIP-L 16 + CLIP-G 32 channels, T5 64 channels)."""
import json
import os
import pickle
import threading

import h5py
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import StableDiffusion3Pipeline
from rsm_testkit import get_tiny_model
from torch.utils.data import DataLoader

from sd35zo import embeddings as emb
from sd35zo.embeddings import (
    PrecomputedEmbeddingDataset,
    encode_prompts,
    merge_shards,
    precompute_split,
    read_negative,
    read_prompt_file,
    shard_range,
)
from sd35zo.preprocess_embeddings import main as preprocess_main

TXT_LINES = ["a red cat", "", "   two dogs on a mat  ", "\t", 'a sign that says "stop"', "a blue bird"]
NONBLANK = ["a red cat", "two dogs on a mat", 'a sign that says "stop"', "a blue bird"]
GENEVAL = [
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
    {"tag": "position", "include": [{"class": "cat", "count": 1},
                                    {"class": "bench", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a bench left of a cat"},
    {"tag": "single_object", "include": [{"class": "cup", "count": 1}], "exclude": [{"class": "cup", "count": 2}],
     "prompt": "a photo of a cup"},
]
SEQ = 77 + 128  # CLIP tokens + T5 tokens (spec §6.2)


@pytest.fixture(scope="module")
def pipe():
    return StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"), transformer=None, vae=None)


@pytest.fixture(scope="module")
def files(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("emb")
    txt, jsonl = root / "train.txt", root / "test_metadata.jsonl"
    txt.write_text("\n".join(TXT_LINES) + "\n", encoding="utf-8")
    jsonl.write_text("\n".join([json.dumps(GENEVAL[0]), "", json.dumps(GENEVAL[1]), json.dumps(GENEVAL[2])]) + "\n",
                     encoding="utf-8")
    out = root / "out"
    train = precompute_split(pipe, str(txt), str(out), "train", batch_size=3, dtype=torch.float32)
    test = precompute_split(pipe, str(jsonl), str(out), "test", batch_size=2, dtype=torch.float32)
    return dict(root=root, txt=str(txt), jsonl=str(jsonl), out=out, train=train, test=test)


def _dims(pipe):
    t5 = pipe.text_encoder_3.config.d_model
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    return t5, pooled


def test_prompt_files_skip_blank_lines_and_keep_geneval_metadata(files):
    prompts, metas = read_prompt_file(files["txt"])
    assert prompts == NONBLANK and metas == [{}] * 4
    prompts, metas = read_prompt_file(files["jsonl"])
    assert prompts == [g["prompt"] for g in GENEVAL]
    assert metas == GENEVAL


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected a JSON object with a 'prompt' key"):
        read_prompt_file(str(bad))


def test_file_has_negative_group_and_one_group_per_nonblank_line_with_spec_shapes(files, pipe):
    t5, pooled = _dims(pipe)
    assert (t5, pooled) == (64, 48)  # tiny model; SD3.5-M gives (4096, 2048)
    with h5py.File(files["train"], "r") as h5:
        assert set(h5.keys()) == {"negative", "0", "1", "2", "3"}
        assert h5["negative/prompt_embeds"].shape == (1, SEQ, t5)
        assert h5["negative/pooled_prompt_embeds"].shape == (1, pooled)
        assert h5["negative/prompt_ids"].shape == (1, 256)
        for k in range(4):
            assert h5[f"{k}/prompt_embeds"].shape == (SEQ, t5)
            assert h5[f"{k}/pooled_prompt_embeds"].shape == (pooled,)
            assert h5[f"{k}/prompt_ids"].shape == (256,) and h5[f"{k}/prompt_ids"].dtype == "int64"
    assert sorted(os.listdir(files["out"])) == ["test_embeddings.h5", "train_embeddings.h5"]  # shards removed


def test_stored_embeddings_equal_the_three_encoders_assembled_by_hand(files, pipe):
    # §6.2 built directly from the transformers encoders: CLIP penultimate layers on channels, zero-padded
    # to T5 width, then T5 (128 tokens) on the sequence axis; pooled = both CLIP projections.
    text = NONBLANK[2]
    clip_tokens, clip_pooled = [], []
    for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        clip_tokens.append(out.hidden_states[-2][0])  # [77, d]
        clip_pooled.append(out.text_embeds[0])  # [d]
    ids3 = pipe.tokenizer_3([text], padding="max_length", max_length=128, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids
    t5 = pipe.text_encoder_3(ids3)[0][0]  # [128, 64]
    clip = torch.cat(clip_tokens, dim=-1)  # [77, 48]
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [77, 64]
    expected = torch.cat([clip, t5], dim=0)  # [205, 64]

    ds = PrecomputedEmbeddingDataset(files["train"], files["txt"])
    item = ds[2]
    torch.testing.assert_close(item["prompt_embeds"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(item["pooled_prompt_embeds"], torch.cat(clip_pooled), rtol=1e-5, atol=1e-5)
    assert torch.all(item["prompt_embeds"][:77, 48:] == 0)


def test_dataset_items_align_with_prompt_lines_and_batching_does_not_matter(files, pipe):
    ds = PrecomputedEmbeddingDataset(files["train"], files["txt"])
    assert len(ds) == 4
    for k, text in enumerate(NONBLANK):
        item = ds[k]
        assert item["prompts"] == text and item["indices"] == k and item["metadatas"] == {}
        alone = encode_prompts(pipe, [text])  # encoded without its batch neighbours
        torch.testing.assert_close(item["prompt_embeds"], alone["prompt_embeds"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["pooled_prompt_embeds"], alone["pooled_prompt_embeds"][0])
        decoded = pipe.tokenizer.decode(item["prompt_ids"], skip_special_tokens=True)
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    ds.close()


def test_collate_stacks_tensors_and_keeps_text_and_metadata_lists(files, pipe):
    t5, pooled = _dims(pipe)
    ds = PrecomputedEmbeddingDataset(files["test"], files["jsonl"])
    loader = DataLoader(ds, batch_sampler=[[2, 0], [1]], collate_fn=ds.collate_fn)
    first = next(iter(loader))
    assert first["prompt_embeds"].shape == (2, SEQ, t5)
    assert first["pooled_prompt_embeds"].shape == (2, pooled)
    assert first["prompt_ids"].shape == (2, 256)
    assert first["indices"].tolist() == [2, 0]
    assert first["prompts"] == [GENEVAL[2]["prompt"], GENEVAL[0]["prompt"]]
    assert first["metadatas"] == [GENEVAL[2], GENEVAL[0]]
    # A dataset that has opened its file still pickles (DataLoader workers reopen their own handle).
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[1]["prompt_embeds"], ds[1]["prompt_embeds"])


def test_negative_group_is_the_empty_prompt_repeated_to_batch(files, pipe):
    embeds, pooled = read_negative(files["train"], batch_size=3)
    empty = encode_prompts(pipe, [""])
    assert embeds.shape == (3, SEQ, 64) and pooled.shape == (3, 48)
    for b in range(3):
        torch.testing.assert_close(embeds[b], empty["prompt_embeds"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled[b], empty["pooled_prompt_embeds"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mp", ["fp16", "bf16"])
def test_mixed_precision_storage_round_trips_the_cast_values(files, pipe, mp):
    dtype = emb.STORAGE_DTYPES[mp]
    # batch_size 3 as the float32 file: the same encoder batches, so the exact comparison below is one computation
    # cast twice (another batch size could move a float32 value across a half-precision rounding edge: contract §7)
    path = precompute_split(pipe, files["txt"], str(files["root"] / mp), "train", batch_size=3, dtype=dtype)
    ref = PrecomputedEmbeddingDataset(files["train"], files["txt"])[1]
    item = PrecomputedEmbeddingDataset(path, files["txt"])[1]
    assert item["prompt_embeds"].dtype == dtype and item["prompt_ids"].dtype == torch.int64
    assert torch.equal(item["prompt_embeds"], ref["prompt_embeds"].to(dtype))
    assert torch.equal(item["pooled_prompt_embeds"], ref["pooled_prompt_embeds"].to(dtype))
    negative, _ = read_negative(path, 1)
    assert negative.dtype == dtype


def test_shards_partition_every_index_once_for_any_world_size():
    for n in (0, 1, 4, 7, 64):
        for world in (1, 2, 3, 4, 8):
            covered = [i for r in range(world) for i in shard_range(n, r, world)]
            assert covered == list(range(n))


def test_two_ranks_with_a_barrier_write_the_same_file_as_one_process(files, pipe, tmp_path):
    # Two ranks as threads sharing a barrier, as accelerate processes do; 4 prompts split 2 + 2. Each rank
    # has its own pipeline, as each process does (a tokenizer's padding state is not thread-safe).
    barrier = threading.Barrier(2, timeout=60)
    errors = []
    pipes = [pipe, StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"), transformer=None, vae=None)]

    def run(rank):
        try:
            precompute_split(pipes[rank], files["txt"], str(tmp_path), "train", batch_size=1, dtype=torch.float32,
                             rank=rank, world_size=2, barrier=barrier.wait)
        except Exception as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert os.listdir(tmp_path) == ["train_embeddings.h5"]
    one = PrecomputedEmbeddingDataset(files["train"], files["txt"])
    two = PrecomputedEmbeddingDataset(str(tmp_path / "train_embeddings.h5"), files["txt"])
    for k in range(4):
        torch.testing.assert_close(two[k]["prompt_embeds"], one[k]["prompt_embeds"], rtol=1e-5, atol=1e-5)
        assert torch.equal(two[k]["prompt_ids"], one[k]["prompt_ids"])


def test_merge_rejects_missing_and_duplicate_indices(tmp_path):
    row = {"prompt_embeds": torch.zeros(3, 2), "pooled_prompt_embeds": torch.zeros(2),
           "prompt_ids": torch.zeros(4, dtype=torch.int64)}
    neg = {k: v[None] for k, v in row.items()}
    for name, groups in (("a.h5", ["0", "1"]), ("b.h5", ["1"]), ("c.h5", ["0"])):
        with h5py.File(tmp_path / name, "w") as h5:
            for g in groups:
                emb._write_group(h5, g, row, torch.float32)
    final = str(tmp_path / "final.h5")
    with pytest.raises(ValueError, match="b.h5: prompt index 1 already written"):
        merge_shards([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")], final, neg, 2, torch.float32, False)
    with pytest.raises(ValueError, match="shards hold 1 prompts, expected 2 .first missing index: 1"):
        merge_shards([str(tmp_path / "c.h5")], final, neg, 2, torch.float32, False)
    assert not os.path.exists(final)
    assert sorted(os.listdir(tmp_path)) == ["a.h5", "b.h5", "c.h5"]  # no partial file left behind


def test_interrupted_write_leaves_no_file_and_keeps_a_previous_one(files, pipe, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = emb.encode_prompts

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(emb, "encode_prompts", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        precompute_split(pipe, files["txt"], str(tmp_path), "train", batch_size=2, dtype=torch.float32)
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="train_embeddings.h5"):
        PrecomputedEmbeddingDataset(str(tmp_path / "train_embeddings.h5"), files["txt"])

    # A complete file from an earlier run survives an interrupted re-run untouched.
    monkeypatch.setattr(emb, "encode_prompts", real)
    path = precompute_split(pipe, files["txt"], str(tmp_path), "train", batch_size=2, dtype=torch.float32)
    before = PrecomputedEmbeddingDataset(path, files["txt"])[3]["prompt_embeds"]
    calls["n"] = 0
    monkeypatch.setattr(emb, "encode_prompts", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        precompute_split(pipe, files["txt"], str(tmp_path), "train", batch_size=2, dtype=torch.float32)
    assert os.listdir(tmp_path) == ["train_embeddings.h5"]
    assert torch.equal(PrecomputedEmbeddingDataset(path, files["txt"])[3]["prompt_embeds"], before)


def test_missing_corrupt_or_mismatched_files_fail_with_one_line_naming_the_path(files, tmp_path):
    missing = str(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match="embeddings file not found: .*nope.h5"):
        PrecomputedEmbeddingDataset(missing, files["txt"])
    with pytest.raises(FileNotFoundError, match="prompt file not found: .*nope.txt"):
        PrecomputedEmbeddingDataset(files["train"], str(tmp_path / "nope.txt"))

    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(512))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(open(files["train"], "rb").read()[:2000])
    for bad in (corrupt, truncated):
        with pytest.raises(ValueError) as info:
            PrecomputedEmbeddingDataset(str(bad), files["txt"])
        msg = str(info.value)
        assert str(bad) in msg and "\n" not in msg and "not a readable HDF5" in msg

    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5.create_group("0")
    with pytest.raises(ValueError, match="foreign.h5: no 'negative' group"):
        PrecomputedEmbeddingDataset(str(foreign), files["txt"])

    # Wrong prompt file: different number of lines fails at construction, same count but other text on access.
    with pytest.raises(ValueError, match="holds 4 prompts but .*test_metadata.jsonl has 3"):
        PrecomputedEmbeddingDataset(files["train"], files["jsonl"])
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("\n".join([NONBLANK[1], NONBLANK[0], NONBLANK[2], NONBLANK[3]]))
    ds = PrecomputedEmbeddingDataset(files["train"], str(shuffled))
    assert ds[2]["prompts"] == NONBLANK[2]
    with pytest.raises(ValueError, match="group 0 was encoded from 'a red cat' but line 0"):
        ds[0]


def test_cli_writes_train_and_test_files_and_rejects_bad_flags(files, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = preprocess_main(["--output_dir", str(out), "--train_prompt_file", files["txt"],
                          "--test_prompt_file", files["jsonl"], "--pretrained_model", str(get_tiny_model("sd35")),
                          "--mixed_precision", "no", "--batch_size", "3"])
    AcceleratorState._reset_state(reset_partial_state=True)  # the CLI's Accelerator must not leak into other tests
    assert rc == 0
    assert sorted(os.listdir(out)) == ["test_embeddings.h5", "train_embeddings.h5"]
    ref = PrecomputedEmbeddingDataset(files["test"], files["jsonl"])[2]
    got = PrecomputedEmbeddingDataset(str(out / "test_embeddings.h5"), files["jsonl"])[2]
    torch.testing.assert_close(got["prompt_embeds"], ref["prompt_embeds"], rtol=1e-5, atol=1e-5)

    base = ["--output_dir", str(out), "--train_prompt_file", files["txt"], "--test_prompt_file", files["jsonl"]]
    for extra, expected in ((["--mixed_precision", "fp8"], "invalid choice: 'fp8'"),
                            (["--batch_size", "0"], "--batch_size must be a positive int"),
                            (["--test_prompt_file", str(tmp_path / "x.txt")], "--test_prompt_file: file not found")):
        with pytest.raises(SystemExit):
            preprocess_main(base + extra)
        assert expected in capsys.readouterr().err
