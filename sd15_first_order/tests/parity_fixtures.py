"""Fixed inputs for the parity tests (tests/test_parity.py): small SD1.5-architecture models whose weights are
a closed-form function of their parameter index (no random init, so they do not depend on library init code or
RNG), seeded tensors, a toy differentiable reward and the run configs. Everything is float64.

The golden numbers in test_parity.py were produced by running the reference implementation's own functions
(jaylee2000/rsm e8be3df, sd15_first_order: `ddim_step_with_logprob`, `pred_orig_latent`, `pipeline_with_logprob`,
`DDPTrainer.get_ddpm_*`, `DDPTrainer.shuffle_and_batch_samples`, `SimpleResNablaDBTrainer.policy_update`)
outside this repository on the inputs built here, and keeping only the resulting numbers.
"""
from __future__ import annotations

import math

import torch

DTYPE = torch.float64
SEED = 42
NUM_STEPS = 50
LATENT = (4, 8, 8)
TEXT_DIM = 16
LORA_RANK = 4


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         set_alpha_to_one=False, steps_offset=1, clip_sample=False, timestep_spacing="leading",
                         prediction_type="epsilon")


def deterministic_fill(module: torch.nn.Module, salt: float) -> None:
    """Every parameter := a sine pattern of its index, scaled like a sensible init (norm weights near 1)."""
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted(module.named_parameters())):
            phase = torch.arange(param.numel(), dtype=DTYPE) * 0.7311 + i * 1.37 + salt
            values = torch.sin(phase)
            if param.ndim >= 2:
                values = values / math.sqrt(param[0].numel())
            elif "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.1 * values
            else:
                values = 0.05 * values
            param.copy_(values.view_as(param).to(param.dtype))


def unet():
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(sample_size=LATENT[1], in_channels=4, out_channels=4,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, cross_attention_dim=TEXT_DIM,
                                 attention_head_dim=2)
    deterministic_fill(model, 0.1)
    return model.to(DTYPE).requires_grad_(False)


def add_lora(model):
    """Adapter "pf" on to_q/k/v/out.0 (r 4, alpha 4); lora_A := a fixed pattern, lora_B := 0 (policy = reference)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]), adapter_name="pf")
    model.set_adapter("pf")
    with torch.no_grad():
        for i, (name, param) in enumerate(sorted((n, p) for n, p in model.named_parameters() if ".pf." in n)):
            if "lora_B" in name:
                param.zero_()
            else:
                phase = torch.arange(param.numel(), dtype=DTYPE) * 0.513 + i * 0.77
                param.copy_((torch.sin(phase) / LORA_RANK).view_as(param))
    model.to(DTYPE)
    return [p for n, p in model.named_parameters() if ".pf." in n]


def vae():
    from diffusers import AutoencoderKL

    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, sample_size=16,
                          scaling_factor=0.18215)
    deterministic_fill(model, 0.3)
    return model.to(DTYPE).requires_grad_(False)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompt_embeds(batch: int = 2):
    """([batch, 77, 16] prompt embeddings, [1, 77, 16] negative embedding)."""
    gen = generator(7)
    return torch.randn(batch, 77, TEXT_DIM, generator=gen, dtype=DTYPE), torch.randn(1, 77, TEXT_DIM, generator=gen, dtype=DTYPE)


def toy_reward(images, prompts, metadata=None):
    """A differentiable reward on [B, 3, H, W]: 10 x (mean red - 0.5 mean green)."""
    return 10.0 * (images[:, 0].mean(dim=(1, 2)) - 0.5 * images[:, 1].mean(dim=(1, 2))), {}


def step_inputs(dtype=DTYPE):
    """Inputs of the DDIM step goldens: per-row timesteps, ε, x, noise, a next state and a per-row strength."""
    gen = generator(11)
    t = torch.tensor([981, 481, 21, 1])
    eps = torch.randn(4, *LATENT, generator=gen, dtype=DTYPE).to(dtype)
    x = torch.randn(4, *LATENT, generator=gen, dtype=DTYPE).to(dtype)
    noise = torch.randn(4, *LATENT, generator=gen, dtype=DTYPE).to(dtype)
    x_next = torch.randn(4, *LATENT, generator=gen, dtype=DTYPE).to(dtype)
    strength = torch.tensor([0.5, 1.0, 2.0, 0.25], dtype=torch.float32).view(4, 1, 1, 1)
    return t, eps, x, noise, x_next, strength


def checksum(tensor: torch.Tensor) -> list:
    """[sum, sum of |x|, sum of x², first element] of a tensor, in float64."""
    values = tensor.detach().double()
    return [values.sum().item(), values.abs().sum().item(), (values ** 2).sum().item(), values.flatten()[0].item()]


# run configs (the keys policy_update reads); GA 1 -> one optimizer step per trajectory (2 steps)
BASE_TRAIN = dict(batch_size=1, gradient_accumulation_steps=1, lr=1e-3, timestep_fraction=0.2, low_var_subsampling=True,
                  cfg=True, num_inner_epochs=1, pretrained_strength_sigma_scale=1.0, reward_scale=100.0,
                  reward_adaptive_sigma_scale=1.0, forward_loss_scale=1.0, unet_reg_scale=100.0,
                  normalize_unet_reg_by_one_minus_alpha_bar_t=False, gradient_checkpointing=False, max_grad_norm=1.0,
                  adam=dict(use_8bit=False, beta1=0.9, beta2=0.999, weight_decay=1e-4, epsilon=1e-8))
MODES = {
    "pruned": dict(pretrained_strength=1.0, reward_adaptive_mode="squared", use_z0=False),
    "ours": dict(pretrained_strength="sigma", reward_adaptive_mode="sigma", use_z0=True),
    "mixed": dict(pretrained_strength=0.5, reward_adaptive_mode="sigma_times_oldgamma", use_z0=False,
                  reward_adaptive_sigma_scale=2.0, normalize_unet_reg_by_one_minus_alpha_bar_t=True),
}
SAMPLE = dict(batch_size=2, num_batches_per_epoch=1, eta=1.0, cfg_scale=5.0, num_steps=NUM_STEPS)
