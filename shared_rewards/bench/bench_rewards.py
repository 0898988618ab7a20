"""Images per second for every reward of the catalogue: forward, and forward+backward where differentiable.

    python shared_rewards/bench/bench_rewards.py                      # tiny checkpoints, CPU (`make bench`)
    python shared_rewards/bench/bench_rewards.py --full-size --device cuda --size 512 --batch-size 8

Default: the rsm_testkit tiny checkpoints (a smoke test of the timing code, not a measurement). With
`--full-size`, random-weight checkpoints of the real architectures are written once under `--full-size-dir`
in the layout each reward loads (open_clip ViT-H-14 for HPSv2, HF CLIP ViT-H/14 for PickScore, ViT-L/14
for the aesthetic head, ViT-B/16 for CLIPScore, BLIP ViT-L + BERT-base for ImageReward), so the numbers are
the real models' speed without downloading anything. Rewards with a `path` option are timed on both the
tensor path and the PIL path. A reward that fails to load is listed as skipped with the reason. There are
no timing assertions anywhere: this prints a table (and `--json` writes it).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from shared_rewards.preprocess import CLIP_MEAN, CLIP_STD

log = logging.getLogger("bench_rewards")

PROMPTS = ["a photo of a cat on the beach", "a red car in the snow", "an astronaut riding a horse",
           'a sign that says "hello"']

# ---------------------------------------------------------------- full-size random checkpoints
# HF CLIPConfig values of the hub checkpoints (config.json of each repo).
HF_CLIP = {
    # laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the PickScore_v1 architecture
    "vit-h-14": dict(text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               hidden_act="gelu"),
                     vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                 patch_size=14, image_size=224, hidden_act="gelu"),
                     projection_dim=1024),
    # openai/clip-vit-large-patch14
    "vit-l-14": dict(text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                     vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                 patch_size=14, image_size=224),
                     projection_dim=768),
    # openai/clip-vit-base-patch16
    "vit-b-16": dict(text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                     vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 patch_size=16, image_size=224),
                     projection_dim=512),
}


def _write_hf_clip(out_dir: Path, arch: str) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rsm_testkit.tokenizers import clip_tokenizer, special_ids

    spec = HF_CLIP[arch]
    tokenizer = clip_tokenizer()  # small vocabulary; the 49408-row embedding is kept for the real size
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **spec["text"],
                                         **special_ids(tokenizer)),
                        vision_config=spec["vision"], projection_dim=spec["projection_dim"])
    CLIPModel(config).save_pretrained(out_dir)
    size = spec["vision"]["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_mean=CLIP_MEAN, image_std=CLIP_STD)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out_dir)


def _write_hps(out_dir: Path) -> None:
    import open_clip

    from shared_rewards.hps import CHECKPOINTS

    model = open_clip.create_model("ViT-H-14", pretrained=None)
    state = {k: v.half() for k, v in model.state_dict().items()}  # the hub files are fp16 ("compressed")
    torch.save({"state_dict": state}, out_dir / CHECKPOINTS["v2.1"])  # the version the papers use


def _write_aesthetic_head(out_dir: Path) -> None:
    from torch import nn

    widths = [768, 1024, 128, 64, 16, 1]  # trl-lib/ddpo-aesthetic-predictor on CLIP ViT-L/14 embeddings
    state = {}
    for index, (d_in, d_out) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:])):
        layer = nn.Linear(d_in, d_out)
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = layer.weight.detach(), layer.bias.detach()
    torch.save(state, out_dir / "aesthetic-model.pth")


def _write_imagereward(out_dir: Path) -> None:
    """THUDM/ImageReward v1.0: BLIP ViT-L/16 (1024 wide, 24 layers) + BERT-base med encoder + MLP head."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from rsm_testkit.rewards_blip import original_layout, write_imagereward

    vision = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=224, patch_size=16,
                                              layer_norm_eps=1e-6))
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
           "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
           "vocab_size": 30524, "encoder_width": 1024, "add_cross_attention": True}
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12, encoder_hidden_size=1024,
        is_decoder=True, bos_token_id=None, eos_token_id=None, sep_token_id=None), add_pooling_layer=False)
    widths = (768, 1024, 128, 64, 16, 1)
    layers: list[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [torch.nn.Linear(d_in, d_out)] + ([torch.nn.Dropout(0.1)] if i < 3 else [])
    write_imagereward(out_dir, original_layout(vision, text, torch.nn.Sequential(*layers)), med_config=med,
                      num_attention_heads=16)


def _write_bert_tokenizer(out_dir: Path) -> None:
    from rsm_testkit.tokenizers import bert_tokenizer

    bert_tokenizer().save_pretrained(out_dir)


FULL_SIZE_WRITERS: dict[str, Callable[[Path], None]] = {
    "hps_vit_h_14": _write_hps,
    "clip_vit_h_14": lambda d: _write_hf_clip(d, "vit-h-14"),
    "clip_vit_l_14": lambda d: _write_hf_clip(d, "vit-l-14"),
    "clip_vit_b_16": lambda d: _write_hf_clip(d, "vit-b-16"),
    "aesthetic_head": _write_aesthetic_head,
    "imagereward_v1": _write_imagereward,
    "bert_tokenizer": _write_bert_tokenizer,
}
# reward -> {option: checkpoint name}
FULL_SIZE_OPTIONS = {
    "hpsv2": {"weights": "hps_vit_h_14"},
    "pickscore": {"weights": "clip_vit_h_14", "processor": "clip_vit_h_14"},
    "aesthetic": {"clip": "clip_vit_l_14", "weights": "aesthetic_head"},
    "clipscore": {"weights": "clip_vit_b_16"},
    "imagereward": {"weights": "imagereward_v1", "tokenizer": "bert_tokenizer"},
}


def full_size_checkpoint(name: str, root: Path) -> Path:
    """`root/name`, written once with random weights (a `.done` marker guards against half-written dirs)."""
    out = root / name
    if not (out / ".done").exists():
        out.mkdir(parents=True, exist_ok=True)
        log.info("writing random full-size checkpoint %s (once)", out)
        torch.manual_seed(0)
        FULL_SIZE_WRITERS[name](out)
        (out / ".done").touch()
    return out


def reward_options(name: str, full_size: bool, root: Path) -> dict | None:
    """load_reward options for the tiny or full-size random checkpoint; None when there is none."""
    from shared_rewards.registry import reward_class

    if reward_class(name).weights_source.startswith("none"):
        return {}
    if full_size:
        if name not in FULL_SIZE_OPTIONS:
            return None
        return {opt: str(full_size_checkpoint(ckpt, root)) for opt, ckpt in FULL_SIZE_OPTIONS[name].items()}
    from rsm_testkit import tiny_reward_options

    return tiny_reward_options(name) or None


# ---------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(reward, batch: int, size: int, device: torch.device, warmup: int, repeats: int) -> dict:
    """images/s of one loaded reward on random images `[batch, 3, size, size]`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)  # [B, 3, H, W] in [0, 1]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

    def forward() -> None:
        with torch.no_grad():
            reward(images, prompts)

    row = {"forward": batch / seconds_per_call(forward, device, warmup, repeats)}
    if getattr(reward, "differentiable", False):
        def forward_backward() -> None:
            leaf = images.detach().requires_grad_(True)
            reward(leaf, prompts).scores.sum().backward()

        row["forward_backward"] = batch / seconds_per_call(forward_backward, device, warmup, repeats)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    from shared_rewards.registry import CATALOGUE, load_reward, reward_class
    from shared_rewards.registry import reward_options as option_names

    device = torch.device(args.device)
    rows = []
    for name in args.rewards or list(CATALOGUE):
        base = {"reward": name}
        try:
            options = reward_options(name, args.full_size, Path(args.full_size_dir))
            paths = ["tensor", "pil"] if "path" in option_names(reward_class(name)) else [None]
        except Exception as err:  # noqa: BLE001 - reported in the table
            rows.append({**base, "skipped": f"{type(err).__name__}: {err}"})
            continue
        if options is None:
            rows.append({**base, "skipped": "no " + ("full-size" if args.full_size else "tiny") + " checkpoint"})
            continue
        for path in paths:
            row = {**base, "path": path or "-"}
            try:
                reward = load_reward(name, device=device, dtype=args.dtype,
                                     **options, **({"path": path} if path else {}))
            except Exception as err:  # noqa: BLE001
                rows.append({**row, "skipped": f"{type(err).__name__}: {err}".splitlines()[0][:120]})
                continue
            for batch in args.batch_size:
                for size in args.size:
                    try:
                        result = bench_one(reward, batch, size, device, args.warmup, args.repeats)
                    except Exception as err:  # noqa: BLE001
                        result = {"skipped": f"{type(err).__name__}: {err}".splitlines()[0][:120]}
                    rows.append({**row, "batch": batch, "size": size, **result})
                    print(format_row(rows[-1]), flush=True)
            del reward
    return rows


COLUMNS = ("reward", "path", "batch", "size", "forward", "forward_backward")
HEADER = f"{'reward':24s} {'path':6s} {'batch':>5s} {'size':>5s} {'fwd img/s':>10s} {'fwd+bwd img/s':>14s}  note"


def format_row(row: dict) -> str:
    def number(key: str) -> str:
        return f"{row[key]:.2f}" if key in row else "-"

    return (f"{row['reward']:24s} {row.get('path', '-'):6s} {str(row.get('batch', '-')):>5s} "
            f"{str(row.get('size', '-')):>5s} {number('forward'):>10s} {number('forward_backward'):>14s}  "
            f"{('skipped: ' + row['skipped']) if 'skipped' in row else ''}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rewards", nargs="+", default=None, help="default: the whole catalogue")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4])
    parser.add_argument("--size", type=int, nargs="+", default=None,
                        help="image sizes in pixels (default: 64 tiny, 512 full size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="reward weight dtype (float32, bfloat16, float16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", action="store_true",
                        help="random-weight checkpoints of the real architectures (for a GPU machine)")
    parser.add_argument("--full-size-dir", default=".cache/bench_full_size",
                        help="where the full-size random checkpoints are written once (default: %(default)s)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.size = args.size or ([512] if args.full_size else [64])
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's root-logger notes about random weights
    log.setLevel(logging.INFO)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    args = parse_args(argv)
    torch.set_grad_enabled(True)
    weights = "full-size random" if args.full_size else "tiny random"
    print(f"reward throughput on {args.device} ({weights} weights, dtype {args.dtype}, median of {args.repeats})")
    print(HEADER, flush=True)
    rows = run(args)
    skipped = [r for r in rows if "skipped" in r and "batch" not in r]
    for row in skipped:
        print(format_row(row))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": args.device, "weights": weights, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
