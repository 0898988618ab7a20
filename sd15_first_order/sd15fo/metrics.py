"""What a run reports (contract §4-§5): `metrics.jsonl` always (main process), wandb or TensorBoard when
`report_to` asks, image grids, the per-epoch console line and peak memory.

wandb logs only when it can: `wandb.mode: auto` is online with WANDB_API_KEY set and off otherwise (a line says
so); `offline` logs without a key. Upstream always required a W&B login (spec §9 item 2).
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

from .run_folder import METRICS_FILE, strict

logger = logging.getLogger("sd15fo.metrics")


class MetricLogger:
    """One strict-JSON object a line in `<run_dir>/metrics.jsonl` ("kind": "step" per optimizer step, "epoch" per
    epoch); the same records go to wandb / TensorBoard. `lines` counts the file's records (a checkpoint stores
    it so a resume can cut the file back)."""

    def __init__(self, run_dir: str, config: dict, is_main: bool):
        self.is_main, self.run_dir = is_main, run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.lines, self.wandb, self.tensorboard = 0, None, None
        if not is_main:
            return
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.lines = sum(1 for _ in f)
        if config["report_to"] == "wandb":
            mode = config["wandb"]["mode"]
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "disabled"
                if mode == "disabled":
                    logger.info("report_to=wandb but WANDB_API_KEY is not set: wandb is off (wandb.mode: offline "
                                "logs without a key); metrics go to %s", self.path)
            if mode != "disabled":
                import wandb

                self.wandb = wandb.init(project=config["wandb"]["project"], entity=config["wandb"]["entity"],
                                        mode=mode, dir=run_dir, name=os.path.basename(run_dir), config=config)
        elif config["report_to"] == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, record: dict, step: int, kind: str = "step") -> None:
        if not self.is_main:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating, float)) else v) for k, v in record.items()}
        line = strict({"kind": kind, "step": step, **clean})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        self.lines += 1
        numbers = {k: v for k, v in line.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(f"{kind}/{key}", value, step)

    def log_images(self, name: str, images: torch.Tensor, captions: Sequence[str], step: int, limit: int = 8) -> Optional[str]:
        """Up to `limit` images [n, 3, H, W] in [0, 1] as one JPEG grid `<run_dir>/images/<name>.jpg` (and wandb
        images captioned "prompt | reward" when wandb is on). Returns the file's path."""
        if not self.is_main or images is None or images.shape[0] == 0:
            return None
        from PIL import Image

        pixels = (images[:limit].detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).numpy()  # [n, H, W, 3]
        folder = os.path.join(self.run_dir, "images")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.jpg")
        grid(pixels, columns=min(len(pixels), 4)).save(path, quality=90)
        if self.wandb is not None:
            import wandb

            self.wandb.log({name.split("_")[0]: [wandb.Image(Image.fromarray(p).resize((256, 256)), caption=c)
                                                for p, c in zip(pixels, captions)]}, step=step)
        return path

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def grid(pixels: np.ndarray, columns: int):
    """[n, H, W, 3] uint8 -> a PIL image of rows of `columns` tiles."""
    from PIL import Image

    n, height, width, _ = pixels.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
    return Image.fromarray(canvas)


def peak_memory(device, prefix: str = "") -> dict:
    """Peak memory (MiB) since the last call: the CUDA allocator peak (then reset), or on a CPU the process's
    peak resident set so far (it cannot be reset)."""
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return {f"{prefix}peak_memory_mib": peak, f"{prefix}peak_memory_kind": "cuda_allocated"}
    import resource

    return {f"{prefix}peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            f"{prefix}peak_memory_kind": "cpu_max_rss"}


def console_line(record: dict, max_epochs: int) -> str:
    """`epoch 3/100  reward 0.2512 ± 0.0123  loss 12.3  45.6 s  1.4 samples/s  eval 0.2600  saved <path>`"""
    def number(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "nan"

    parts = [f"epoch {record['epoch']}/{max_epochs}",
             f"reward {number(record.get('reward_mean'), '.4f')} ± {number(record.get('reward_std'), '.4f')}",
             f"loss {number(record.get('loss'), '.4g')}", f"{record['time_per_epoch']:.1f} s"]
    if record.get("samples_this_epoch"):
        parts.append(f"{record['samples_this_epoch'] / max(record['time_per_epoch'], 1e-9):.2f} samples/s")
    if record.get("eval_reward_mean") is not None:
        parts.append(f"eval {number(record['eval_reward_mean'], '.4f')}")
    for key, label in (("skipped_steps", "skipped steps"), ("scaler_skipped_steps", "scaler-skipped steps")):
        if record.get(key):
            parts.append(f"{label} {record[key]}")
    if record.get("checkpoint_path"):
        parts.append(f"saved {record['checkpoint_path']}")
    return "  ".join(parts)
