"""SD1.5 as both trainers use it (spec §4.1, §6.1 items 7-12, §10.1, §10.3): the diffusers models loaded from a hub
id or a local folder, the LoRA, prompt encoding, the classifier-free-guided noise prediction and the frozen
reference.

    ε̂ = ε_u + s (ε_c − ε_u)   on the doubled batch [uncond; cond] (unconditional half first) when s > 1

The reference model is the pretrained UNet. With LoRA it is the policy with its adapter switched off (upstream
deep-copied the adapter-equipped UNet at initialisation, whose LoRA B = 0 makes it the same function, while
sharing the frozen weights); with full fine-tuning it is a frozen copy made before training.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .config import WITHDRAWN_MODELS, ConfigError

logger = logging.getLogger("sd15zo.models")

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # upstream train_grpo*.py LoraConfig: every attention projection
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object                 # DDIMScheduler (SD1.5 config: leading spacing, steps_offset 1)
    alphas_cumprod: torch.Tensor      # [1000] float32 on the device
    weight_dtype: torch.dtype
    unet_ref: Optional[torch.nn.Module]  # full fine-tuning only; with LoRA the reference is the adapter switched off
    latent_shape: tuple               # (C, h, w) of one latent
    negative: torch.Tensor            # [1, 77, D] the empty prompt's embedding

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device


def resolve_model_id(model: str) -> str:
    return WITHDRAWN_MODELS.get(model, model)


def load_scheduler(model: str, revision: str):
    """upstream: the DDPM scheduler config re-instantiated as DDIM (spec §3.1)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    ddpm = DDPMScheduler.from_pretrained(model, subfolder="scheduler", revision=revision)
    return DDIMScheduler.from_config(ddpm.config)


def _from_pretrained(model: str, revision: str, variant, what: str, load):
    try:
        return load(model)
    except (OSError, ValueError) as error:
        mirror = WITHDRAWN_MODELS.get(model)
        if mirror is not None:
            logger.info("%s is no longer on the hub; loading its mirror %s", model, mirror)
            return _from_pretrained(mirror, revision, variant, what, load)
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(f"pretrained_model={model!r} (revision {revision!r}): cannot load the SD1.5 {what}: "
                          f"{reason}") from None


def load_models(config, device) -> Models:
    """Tokenizer, text encoder, UNet, VAE and scheduler of `pretrained_model` at `revision` (`variant` for the UNet
    and VAE), frozen, on `device`; the VAE and text encoder (and the UNet's frozen base under LoRA) in the weight
    dtype of `mixed_precision` (fp16 in the presets), trainable weights in fp32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model, revision, variant = config.pretrained_model, config.revision, config.variant
    weight_dtype = DTYPES[config.mixed_precision]
    scheduler = _from_pretrained(model, revision, variant, "scheduler", lambda m: load_scheduler(m, revision))
    tokenizer = _from_pretrained(model, revision, variant, "tokenizer", lambda m: CLIPTokenizer.from_pretrained(
        m, subfolder="tokenizer", revision=revision))
    text_encoder = _from_pretrained(model, revision, variant, "text encoder", lambda m: CLIPTextModel.from_pretrained(
        m, subfolder="text_encoder", revision=revision, dtype=weight_dtype))
    unet_dtype = weight_dtype if config.use_lora else torch.float32  # full fine-tuning trains fp32 weights
    unet = _from_pretrained(model, revision, variant, "UNet", lambda m: UNet2DConditionModel.from_pretrained(
        m, subfolder="unet", revision=revision, variant=variant, torch_dtype=unet_dtype))
    vae = _from_pretrained(model, revision, variant, "VAE", lambda m: AutoencoderKL.from_pretrained(
        m, subfolder="vae", revision=revision, variant=variant, torch_dtype=weight_dtype))
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).to(device)
    unet_ref = None
    if not config.use_lora:
        unet_ref = copy.deepcopy(unet).requires_grad_(False).to(dtype=weight_dtype)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    size = unet.config.sample_size  # latents [C, size, size]; images size x 2^(VAE blocks - 1) pixels (512 for SD1.5)
    latent_shape = (unet.config.in_channels, size, size)
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    models = Models(tokenizer, text_encoder, unet, vae, scheduler, alphas, weight_dtype, unet_ref, latent_shape,
                    negative=None)
    models.negative = encode_prompts(models, [""])[1]  # [1, 77, D]
    return models


def add_lora(unet, rank: int) -> list:
    """PEFT LoRA (rank r, alpha r, Gaussian A, B = 0) on every attention projection of the UNet; returns the
    trainable parameters, upcast to fp32 (upstream `cast_training_params` under fp16; here under bf16 too)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def trainable_parameters(config, models: Models) -> list:
    if config.use_lora:
        return add_lora(models.unet, config.rank)
    params = [p for p in models.unet.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


@torch.no_grad()
def encode_prompts(models: Models, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B, 77], CLIP last hidden states [B, 77, D]) of `prompts`, padded/truncated to 77 tokens."""
    tokenizer = models.tokenizer
    ids = tokenizer(list(prompts), return_tensors="pt", padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length).input_ids.to(models.device)
    return ids, models.text_encoder(ids)[0]


def autocast(config, device):
    """The forward-pass autocast of `mixed_precision` (sampling and training alike; upstream sampled under CUDA's
    default fp16 even for bf16, spec §11 item 17). A no-op for "no"."""
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[config.mixed_precision])


def cfg_noise_pred(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, negative: torch.Tensor,
                   guidance_scale: Optional[float]) -> torch.Tensor:
    """ε̂ for latents x [n, C, h, w] at per-row timesteps t [n] with prompt embeddings cond [n, 77, D]: guided on the
    doubled batch when `guidance_scale` > 1, else the conditional branch alone (`None`: conditional only, the
    training forward with train_cfg=False)."""
    if guidance_scale is not None and guidance_scale > 1.0:
        n = x.shape[0]
        out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([negative.expand(n, -1, -1), cond])).sample
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)
    return unet(x, t, cond).sample


@contextlib.contextmanager
def reference(models: Models):
    """The frozen reference UNet for the duration of the block (the adapter switched off under LoRA)."""
    if models.unet_ref is not None:
        yield models.unet_ref
        return
    models.unet.disable_adapters()
    try:
        yield models.unet
    finally:
        models.unet.enable_adapters()


class NoisePredictor:
    """ε̂(x, t, rows) of the policy (or the reference) for the prompt rows `rows` of `cond`, in float32, under the
    run's autocast. Timesteps are per row ([n]); `rows` indexes `cond` ([n]; None: all rows in order)."""

    def __init__(self, models: Models, cond: torch.Tensor, guidance_scale: Optional[float], autocast_fn,
                 use_reference: bool = False):
        self.models, self.cond, self.scale, self.autocast_fn = models, cond, guidance_scale, autocast_fn
        self.use_reference = use_reference

    def __call__(self, x: torch.Tensor, t: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        cond = self.cond if rows is None else self.cond[rows]
        t = torch.as_tensor(t, device=x.device).long().expand(x.shape[0])
        with self.autocast_fn():
            if self.use_reference:
                with reference(self.models) as unet:
                    out = cfg_noise_pred(unet, x, t, cond, self.models.negative, self.scale)
            else:
                out = cfg_noise_pred(self.models.unet, x, t, cond, self.models.negative, self.scale)
        return out.float()


@torch.no_grad()
def decode(models: Models, latents: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Latents [n, C, h, w] -> images [n, 3, H, W] float32 in [0, 1] (VAE decode of x / scaling_factor, then
    (x/2 + 0.5) clamped), `chunk_size` rows per VAE call."""
    vae = models.vae
    chunk = chunk_size or latents.shape[0] or 1
    images = []
    for start in range(0, latents.shape[0], chunk):
        part = latents[start:start + chunk].to(vae.dtype) / vae.config.scaling_factor
        images.append((vae.decode(part).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images) if images else latents.new_zeros((0, 3, 1, 1))
