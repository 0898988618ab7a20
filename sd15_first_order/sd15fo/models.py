"""SD1.5 pieces, the LoRA policy and its files (spec §2.1-2.3, §5.6).

The scheduler config of `<pretrained>/scheduler` builds a DDIM scheduler (SD1.5: scaled-linear betas
0.00085..0.012, 1000 steps, "leading" spacing with offset 1, so 50 steps are 981, 961, ..., 1); the tokenizer,
CLIP text encoder, UNet and VAE load separately with `from_pretrained` (hub id or local directory, `revision`,
`variant` for the UNet and VAE). Every base weight is frozen and cast to the weight dtype (bf16 in the paper
configs). The policy is one PEFT LoRA adapter "pf" (r 8, alpha 8, gaussian init so the policy starts equal to
the reference, on to_q/to_k/to_v/to_out.0 of every attention) kept in fp32; the reference is the same UNet with
the adapter disabled (`reference_mode`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

logger = logging.getLogger("sd15fo.models")

ADAPTER = "pf"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default name: load_lora_weights(<dir>) finds it
UPSTREAM_LORA_WEIGHTS = "unet_lora_weights.safetensors"  # the reference's name (parity files)
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32, "fp32": torch.float32}


class ModelLoadError(ValueError):
    """The base model cannot be loaded; one line naming the key and the reason."""


@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module  # with the "pf" adapter; the policy (wrap it for DDP separately)
    vae: torch.nn.Module
    scheduler: object  # DDIMScheduler built from the DDPM config (never mutated here)
    alphas_cumprod: torch.Tensor  # [T] float32 on the device
    weight_dtype: torch.dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def latent_shape(self) -> tuple:
        """(C, h, w) of the UNet's latents (4, 64, 64 for SD1.5)."""
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The scheduler's sampling timesteps for `num_steps` [N] (int64, on the device), from a private copy so
        the shared scheduler is never mutated (spec §9 item 15)."""
        from diffusers import DDIMScheduler

        copy = DDIMScheduler.from_config(self.scheduler.config)
        copy.set_timesteps(num_steps)
        return copy.timesteps.to(self.alphas_cumprod.device, torch.long)


def load_models(config: dict, device: torch.device) -> Models:
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = config["model"]
    where, revision, variant = model["pretrained"], model["revision"], model["variant"]
    weight_dtype = WEIGHT_DTYPES[config["mixed_precision"]]
    try:
        ddpm = DDPMScheduler.from_pretrained(where, subfolder="scheduler", revision=revision)
        scheduler = DDIMScheduler.from_config(ddpm.config)
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", revision=revision)
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", revision=revision, variant=variant)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", revision=revision, variant=variant)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", revision=revision)
    except (OSError, ValueError) as error:  # hub errors are OSErrors; a malformed config a ValueError
        reason = " ".join(str(error).split())[:300]
        raise ModelLoadError(f"model.pretrained={where!r} (revision {revision!r}): cannot load the SD1.5 "
                             f"components: {reason}") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.to(device, dtype=weight_dtype)
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    return Models(tokenizer, text_encoder, unet, vae, scheduler, alphas_cumprod, weight_dtype)


def add_lora(unet, rank: int, alpha: float, use_xformers: bool = True) -> list:
    """Add adapter "pf" (fp32 weights on top of the frozen base) and return its parameters, in module order."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                     adapter_name=ADAPTER)
    if use_xformers:
        _try_xformers(unet)
    unet.set_adapter(ADAPTER)
    params = []
    for name, param in unet.named_parameters():
        if f".{ADAPTER}." in name:
            param.data = param.data.float()  # trainable weights (and AdamW state) stay fp32 under bf16/fp16
            params.append(param)
    return params


def _try_xformers(unet) -> None:
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        logger.info("xformers is not installed; the UNet uses PyTorch attention")
        return
    try:
        unet.enable_xformers_memory_efficient_attention()
        logger.info("xformers memory-efficient attention is on")
    except Exception as error:  # noqa: BLE001 - any failure: fall back, as upstream
        logger.warning("xformers is installed but could not be enabled (%s: %s); using PyTorch attention",
                       type(error).__name__, error)


@contextlib.contextmanager
def reference_mode(unet):
    """The frozen pretrained UNet: the LoRA adapter off inside, back on ("pf" active) after."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
        unet.set_adapter(ADAPTER)


def lora_state_dict(unet) -> dict:
    """The adapter's tensors in diffusers naming (`...to_q.lora.down.weight` / `lora.up`), on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(unet, directory: str, weight_name: str = LORA_WEIGHTS) -> None:
    """The LoRA as `StableDiffusionPipeline.save_lora_weights` writes it (keys `unet.…lora.down/up.weight`) with
    the adapter config in the file's metadata, so `pipe.load_lora_weights(directory)` applies alpha/r."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=lora_state_dict(unet), weight_name=weight_name,
                                              unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict())


def find_lora_file(path: str) -> str:
    """A LoRA .safetensors file: the path itself, or the one inside a folder (ours: lora/, upstream: the
    checkpoint_epoch<E> folder)."""
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, "lora", LORA_WEIGHTS), os.path.join(path, LORA_WEIGHTS),
                      os.path.join(path, UPSTREAM_LORA_WEIGHTS)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: no {LORA_WEIGHTS} (or upstream's {UPSTREAM_LORA_WEIGHTS}) there")


def load_lora_into(unet, path: str) -> None:
    """Load a LoRA written by `save_lora` or by the reference trainer into adapter "pf" (strict about LoRA
    tensors: a missing or unexpected adapter tensor is an error naming it)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(find_lora_file(path))
    state = {k[len("unet."):] if k.startswith("unet.") else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name=ADAPTER)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if f".{ADAPTER}." in k or "lora_" in k]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise ValueError(f"{path}: the LoRA does not fit this UNet ({len(unexpected)} unexpected and {len(missing)} "
                         f"missing adapter tensors, e.g. {example})")


def save_conv_out(unet, path: str) -> None:
    """The frozen conv_out weights (parity: upstream wrote them with every checkpoint, spec §5.6)."""
    torch.save({k: v.detach().cpu() for k, v in unet.conv_out.state_dict().items()}, path)


def read_scheduler_config(pretrained: str) -> Optional[dict]:
    path = os.path.join(pretrained, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
