"""Defaults shared by every preset (spec §1.3): upstream's keys and values (rsm `sd35_first_order/config/
default_config.py`), plus the keys marked "ours" for what upstream hard-coded or lacked.

Not a config file on its own (it has no `get_config`, as upstream): pass a preset, e.g.
`--config=config/hpsv2_geneval_ours.py`. Keys no trainer reads (`experiment.method`, `logging.save_json`) are
kept so upstream overrides stay valid; changing one is refused at start-up (sd35fo/config_check.py).

`quirks.*` switch the upstream behaviours that change the numbers (spec §10 N1-N9): True (the default, except
N5) reproduces upstream, False is the fix.
"""
from ml_collections import config_dict


def get_default_configs():
    config = config_dict.ConfigDict()

    training = config.training = config_dict.ConfigDict()
    training.lr = 5e-4                      # AdamW, policy LoRA and value net alike
    training.adam_beta1 = 0.9
    training.adam_beta2 = 0.999
    training.adam_weight_decay = 1e-2
    training.adam_epsilon = 1.e-8
    training.max_grad_norm = 1.0            # clipped separately for the policy and the value net
    training.num_inner_epochs = 1
    training.batch_size = 4                 # B_t per process (upstream comment: 1 with the value net)
    training.gradient_accumulation_steps = 2  # micro-batches per optimizer step (upstream comment: 8 with the value net)
    training.num_epochs = 201
    training.mixed_precision = "bf16"       # "bf16" | "fp16" (half weights; fp16 adds a GradScaler) | "no" (fp32)
    training.allow_tf32 = True
    training.gradscaler_growth_interval = 2000  # fp16 only (upstream also made a scaler for bf16, spec §10 I6)
    training.coeff_terminal = 1000.0        # value net: weight of the terminal loss
    training.reward_masking = False         # average the velocity loss over samples with reward >= 0 only
    training.use_jvp = False                # forces the math SDPA kernel (upstream's only effect of this flag)
    training.detach_dir = True              # value net: stop-gradient on the spatial direction (False has no effect upstream: refused)
    training.quantile_clipping = True       # per-sample norm clipping of reward gradients at tau
    training.use_saved_rgrad_x1 = False     # RSM "ours": terminal reward gradient saved at sampling, reused
    # ours (spec §10 N7): "bf16" = upstream's value-net finite differences (bf16 autocast, eps 1e-4 in latent and in
    # timestep units, the asymmetric temporal lookahead); "fp32" = fp32 arithmetic, spatial steps of 1e-2 along unit
    # directions, a 1e-2 time step divided by the realised step, the same lookahead estimator at s and s - eps (so
    # each quotient is a derivative); "jvp" = as fp32, but the networks' derivatives (d nu/ds, J_nu d, J_R nabla V)
    # exact by double backward. fp32 and jvp need fp32 weights (training.mixed_precision "no")
    training.finite_differences = "bf16"
    training.gradient_checkpointing = False  # ours: recompute transformer activations in backward (saves memory)
    training.nan_policy = "stop"            # ours: a non-finite loss/grad norm/weight "stop"s the run or "skip"s the step

    model = config.model = config_dict.ConfigDict()
    model.lora_rank = 8                     # LoRA r = alpha on to_q/to_k/to_v/to_out.0
    model.reward_scale = 3e7                # beta
    model.timestep_fraction = 1.0           # fraction of the N steps trained per trajectory
    model.value_layers_per_block = 1        # value_net_param='small' only
    model.value_channel_width = (64, 128, 256, 256)  # value_net_param='small' only
    model.unet_reg_scale = 0.0              # weight of the regulariser toward the rollout velocity
    model.use_value_net = False             # full VGG-Flow: learned value residual + consistency/terminal losses
    model.eta_mode = 'quad'                 # 'quad' (1-sigma)^2 | 'linear' 1-sigma | 'constant' 1
    model.value_net_param = 'lora'          # 'lora' | 'copy' | 'small'

    experiment = config.experiment = config_dict.ConfigDict()
    experiment.method = 'Nabla-DB'          # unused legacy label (upstream)
    experiment.prompt_fn = ""               # set by every preset: a training prompt function (sd35fo/prompts.py)
    experiment.prompt_fn_kwargs = config_dict.ConfigDict()
    experiment.reward_fn = ""               # set by every preset: hpscore | pickscore | imagereward | aesthetic_score
    experiment.reward_options = config_dict.ConfigDict()  # ours: shared_rewards options (weights=<path> etc.)
    experiment.data_dir = ""                # ours: where prompt files are looked up ("" = <repo>/data, fetch_data.py's)

    sampling = config.sampling = config_dict.ConfigDict()
    sampling.num_steps = 20                 # N Euler steps
    sampling.guidance_scale = 5.0           # CFG w (must be > 1)
    sampling.batch_size = 8                 # B_s prompts per sampling batch per process (also the eval batch)
    sampling.num_batches_per_epoch = 1
    sampling.low_var_subsampling = True     # stratified timestep subsampling (timestep_fraction < 1 only)

    pretrained = config.pretrained = config_dict.ConfigDict()
    pretrained.model = "stabilityai/stable-diffusion-3.5-medium"  # hub id or local diffusers directory
    pretrained.revision = "main"
    pretrained.autoencodertiny = True       # decode with TAESD3 instead of the SD3 VAE
    pretrained.autoencodertiny_model = "madebyollin/taesd3"  # ours: hub id or local directory (upstream hard-coded)

    logging = config.logging = config_dict.ConfigDict()
    logging.use_wandb = True                # wandb runs only when WANDB_API_KEY is set (or wandb_mode="offline")
    logging.save_freq = 5                   # checkpoint after 0-based epoch e when e % save_freq == 0, and the last
    logging.num_checkpoint_limit = 500      # newest checkpoints kept (upstream never enforced it)
    logging.save_json = True                # unused (upstream)
    logging.wandb_dir = './wandb/'
    logging.wandb_key = 'YOUR_WANDB_API_KEY'  # refused if changed: put the key in WANDB_API_KEY (spec §10 I1)
    logging.proj_name = 'vggflow'
    logging.wandb_mode = "auto"             # ours: auto (online with WANDB_API_KEY, else off) | offline | disabled

    saving = config.saving = config_dict.ConfigDict()
    saving.output_dir = './saved_models/'   # root of run folders <output_dir>/<reward>_vggflow_<exp_name>_seed<seed>
    saving.resume_from = ""                 # ours: a checkpoint-<n> folder or a run folder (--resume)
    saving.resume_ignore_config_changes = False  # ours: resume even if keys that change the math differ

    eval = config.eval = config_dict.ConfigDict()
    eval.enabled = False
    eval.every_epochs = 1                   # after 0-based epoch e when e % every_epochs == 0, and the last
    eval.prompt_fn = ""                     # an evaluation prompt function (sd35fo/prompts.py EVAL_PROMPT_FNS)
    # the evaluation prompt function's arguments; defaults are not passed on, so they fit every function
    eval.prompt_fn_kwargs = config_dict.ConfigDict({"path": "", "prompt_key": "prompt"})
    eval.decoder = "taesd"                  # ours: "taesd" (upstream, as training) or "vae" (the full SD3 VAE, I11)

    # Upstream behaviours that change the numbers (spec §10): True = upstream, False = fixed.
    quirks = config.quirks = config_dict.ConfigDict()
    quirks.same_seed_all_ranks = True       # N1: every process draws the same prompts and noise
    quirks.reset_threshold_each_epoch = True  # N2: tau = 1.0 at each epoch start (adaptive tau unused at 1 update/epoch)
    quirks.single_rank_quantile = True      # N2: tau and the norm statistics from one rank's norms, divided by W
    quirks.clip_shrink = True               # N3: clip multiplies by |g|/(|g|+1e-8) even below tau
    quirks.rgrad_leaf_weight_dtype = True   # N4: reward gradients taken w.r.t. latents in the weight dtype (bf16)
    quirks.hpd_list_growth = False          # N5: combined HPD prompt sets grow each call (upstream bug; fixed by default)
    quirks.value_net_negative_embeds = True  # N6: the value net sees the empty-prompt embeddings
    quirks.clamp_step_zero = True           # N9: timestep_fraction < 1 never trains step 0 (index 0 -> 1)
    return config


# ours: the shared_rewards options of each reward factory, as the upstream factory built it (spec §8); presets
# copy them into experiment.reward_options, where any can be overridden (e.g. weights=<local path>).
REWARD_OPTIONS = {
    # HPSv2.1 (open_clip ViT-H-14 + HPS_v2.1_compressed.pt), tensor path: bicubic antialiased resize-max-size to
    # 224 + CLIP normalisation, raw cosine
    "hpscore": {"weights": "xswu/HPSv2", "version": "v2.1", "path": "tensor", "antialias": True},
    # PickScore_v1, exp(logit_scale) * cosine, undivided; upstream's ResizeMaxSize geometry ("pad")
    "pickscore": {"weights": "yuvalkirstain/PickScore_v1", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                  "divisor": 1.0, "path": "tensor", "resize_mode": "pad"},
    # ImageReward-v1.0, prompts padded to the BLIP tokenizer's 512 (not the reward model's usual 35)
    "imagereward": {"weights": "THUDM/ImageReward", "tokenizer": "bert-base-uncased", "max_length": 512,
                    "path": "tensor"},
    # LAION aesthetic (linear-MSE head on CLIP ViT-L/14), 224x224 bicubic without antialias ("squash")
    "aesthetic_score": {"clip": "openai/clip-vit-large-patch14", "weights": "trl-lib/ddpo-aesthetic-predictor",
                        "resize_mode": "squash", "path": "tensor"},
}


def preset(prompt_fn, reward_fn, prompt_fn_kwargs=None):
    """The defaults with a preset's prompt function and reward (the three keys every upstream preset sets)."""
    config = get_default_configs()
    config.experiment.prompt_fn = prompt_fn
    config.experiment.reward_fn = reward_fn
    config.experiment.prompt_fn_kwargs = dict(prompt_fn_kwargs or {})
    config.experiment.reward_options = dict(REWARD_OPTIONS[reward_fn])
    return config
