"""Fixtures shared by the component's tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """For tests on tiny tensors: on a shared 2-core runner, intra-op threads cost far more than they save
    (the tiny-SD3 sampler test takes ~0.4 s with one thread and 5-20 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_prompt_embeddings(tmp_path_factory):
    """Four train and two test prompts encoded by the tiny SD3 text encoders into the trainer's HDF5 layout;
    returns the `--config.*` overrides that point a run at them."""
    from diffusers import StableDiffusion3Pipeline
    from rsm_testkit import get_tiny_model

    from sd35zo.embeddings import precompute_split

    root = tmp_path_factory.mktemp("prompts")
    (root / "train.txt").write_text("a red apple\na blue car\na cat on a mat\ntwo dogs\n")
    (root / "test.txt").write_text("a green tree\na yellow bus\n")
    pipe = StableDiffusion3Pipeline.from_pretrained(get_tiny_model("sd35"), transformer=None, vae=None)
    for split in ("train", "test"):
        precompute_split(pipe, str(root / f"{split}.txt"), str(root), split, batch_size=8, dtype=torch.float32)
    return [f"--config.{split}_{kind}={root / name}" for split in ("train", "test")
            for kind, name in (("hdf5_path", f"{split}_embeddings.h5"), ("prompt_file_path", f"{split}.txt"))]
