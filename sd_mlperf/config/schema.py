"""Structured config: one dataclass per concern; defaults are the MLPerf reference values.

Every number here that the benchmark fixes comes from ../shared/REFERENCE.md. A field whose
value has no sane default is MISSING ("???"), so forgetting it fails before any GPU work.
Units are in the names (`_steps`, `_samples`, `_s`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from omegaconf import MISSING

Precision = Literal["fp32", "fp16", "bf16"]


@dataclass
class RunConfig:
    """`run`: naming, seed, division and device of the run."""

    name: str = "sd2_mlperf"
    """Run name; the run directory is `output_dir/name`."""
    output_dir: str = "results"
    """Parent folder of run directories."""
    seed: int | None = None
    """Global seed; each rank, data worker and the evaluation noise derive their own from it. null (the
    MLPerf rule for a timed run): rank 0 draws it from the OS entropy source and every rank takes that one;
    it is logged (`seed`) and saved in config.yaml and every checkpoint. Set it to reproduce a run bit for bit."""
    division: Literal["closed", "open"] = "closed"
    """MLPerf division. `closed` refuses every value the rules fix (config/closed_division.py: model, data,
    schedule, AdamW, cadence, target, evaluation); `open` allows them all."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """Where to train: `auto` takes CUDA when present, else the CPU."""
    submission_org: str = "sd_mlperf"
    """Organisation name written to the MLPerf log."""
    submission_platform: str = "unknown"
    """System name written to the MLPerf log (the system configs set it)."""
    submission_status: Literal["onprem", "cloud", "research", "preview"] = "onprem"
    """The system's availability as the MLPerf log states it (submission_status); `sd-mlperf package` checks it
    against the system description's status (Available on-premise -> onprem, Available cloud -> cloud,
    Research, Development, or Internal (RDI) -> research, Preview -> preview)."""
    num_threads: int | None = None
    """CPU intra-op threads per process (torch.set_num_threads); null keeps torch's default (one per
    core). Tiny models on a shared CPU run several times faster with 1."""


@dataclass
class UNetConfig:
    """`model.unet`: the SD2 UNet topology (REFERENCE.md, 865,910,724 parameters) and its fast paths."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    """ResBlocks per encoder level; the decoder has one more per level."""
    attention_levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Indices of levels with a SpatialTransformer (downsample factors 1, 2, 4; none at the lowest)."""
    head_channels: int = 64
    """Channels per attention head (so 5/10/20 heads at 320/640/1280 channels)."""
    transformer_depth: int = 1
    context_dim: int = 1024
    resblock_norm_groups: int = 16
    """GroupNorm groups in every ResBlock and the output head (MLPerf: 16 groups, not group size 16)."""
    resblock_norm_eps: float = 1e-5
    transformer_norm_groups: int = 32
    """GroupNorm groups at each SpatialTransformer input."""
    transformer_norm_eps: float = 1e-6
    attention_backend: Literal["auto", "te", "sdpa", "math"] = "auto"
    """Core attention math: Transformer Engine fused, torch SDPA, or explicit softmax (reference)."""
    norm_backend: Literal["auto", "apex", "torch"] = "auto"
    """GroupNorm(+SiLU) kernel: apex NHWC fused or torch."""
    channels_last: bool = False
    """Run the whole UNet in channels-last (NHWC) memory format."""
    compile: bool = False
    """Wrap the UNet in torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save memory."""


@dataclass
class VAEConfig:
    """`model.vae`: the frozen AutoencoderKL (f=8) loaded from the frozen checkpoint."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scale_factor: float = 0.18215
    """Latent scale: z = sample * scale_factor."""
    logvar_min: float = -30.0
    logvar_max: float = 20.0


@dataclass
class TextEncoderConfig:
    """`model.text_encoder`: the frozen OpenCLIP ViT-H-14 text tower (penultimate layer + ln_final)."""

    width: int = 1024
    num_heads: int = 16
    num_layers: int = 24
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    skip_last_layers: int = 1
    """Layers dropped from the end ("penultimate": resblocks 0..22 then ln_final)."""


@dataclass
class ModelConfig:
    """`model`: the trained UNet and the frozen VAE and text encoder."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    frozen_checkpoint: str | None = MISSING
    """Path to 512-base-ema.ckpt (or its .safetensors conversion) holding the VAE and text
    tower. `null` builds them with random weights: only for smoke tests and benchmarks."""
    frozen_checkpoint_sha256: str | None = None
    """If set, the checkpoint's sha256 is verified before loading."""


@dataclass
class DiffusionConfig:
    """`diffusion`: the training noise schedule (scaled-linear betas, 1000 steps)."""

    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    """betas = linspace(sqrt(beta_start), sqrt(beta_end), num_timesteps)^2 in float64."""


@dataclass
class SyntheticDataConfig:
    """`data.synthetic`: size of the embedded synthetic dataset (smoke runs)."""

    num_train_samples: int = 256
    num_train_shards: int = 4
    num_val_prompts: int = 16
    image_size: int = 512
    seed: int = 0
    fit_vae_steps: int = 0
    """> 0: before training, fit model.vae to pictures of this synthetic world for this many steps and write it,
    with the random text tower, to model.frozen_checkpoint (inside data.synthetic_dir), so that latents carry
    the picture (sd_mlperf/data/toy_vae.py); reused while the settings stay the same. 0: no fit."""


@dataclass
class DataConfig:
    """`data`: training shards, their format, decoding and the loader."""

    train_format: Literal["moments", "moments_embeddings", "images"] = "moments"
    """`moments`: KEY.npy (1,8,64,64) + KEY.txt (reference); `moments_embeddings`: plus the cached
    text embedding; `images`: raw KEY.jpg decoded and VAE-encoded online."""
    train_shards: str = MISSING
    """Shard pattern: a folder, a glob or a brace pattern (`/data/{00000..00831}.tar`)."""
    num_train_samples: int = 6_513_144
    """Size of the training set, logged as MLPerf `train_samples`: the reference's LAION-400M subset (smoke
    configs set the synthetic set's size)."""
    synthetic_dir: str | None = None
    """If set and empty, `sd-mlperf train` first writes the synthetic dataset here."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    shuffle_buffer_samples: int = 1000
    num_workers: int = 4
    pin_memory: bool = True
    prefetch_factor: int = 2
    decode_backend: Literal["auto", "dali", "nvjpeg", "pil"] = "auto"
    image_size: int = 512
    """Images are resized (shorter side, bicubic) and centre-cropped to this size."""
    image_range: Literal["zero_one", "minus1_1"] = "zero_one"
    """Pixel range fed to the VAE. `zero_one` is the reference's (known bug, the target was set
    with it); `minus1_1` is the fix (open division)."""
    max_bad_fraction: float = 0.01
    """Stop with an error when more than this fraction of samples fail to decode."""
    precompute_batch_size: int = 32
    """Images per VAE batch in `sd-mlperf precompute-latents` (and the smoke run's precompute)."""


@dataclass
class OptimConfig:
    """`optim`: AdamW and the learning-rate schedule (linear warmup, then constant)."""

    name: Literal["adamw"] = "adamw"
    base_lr_per_sample: float = 1.25e-7
    """lr = base_lr_per_sample x global batch size (6.4e-5 at GBS 512)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    warmup_start_factor: float = 1e-6
    """Warmup goes linearly from warmup_start_factor x lr to lr."""
    grad_clip_norm: float | None = None
    """No clipping in the reference; set a norm to enable (open division)."""


@dataclass
class ParallelConfig:
    """`parallel`: data parallelism, the sharded optimizer and the process layout."""

    backend: Literal["auto", "mcore", "torch"] = "auto"
    """Data parallel + optimizer: megatron-core DDP + distributed optimizer, or torch DDP + ZeRO."""
    num_nodes: int = 1
    gpus_per_node: int = 1
    """Processes per node; world size must equal num_nodes x gpus_per_node."""
    distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks."""
    overlap_grad_reduce: bool = True
    """Overlap the gradient reduce-scatter with backward."""
    bucket_size: int | None = None
    """Gradient bucket size in elements; null lets the backend choose."""
    half_weights: bool = False
    """parallel.backend=torch with training.precision fp16/bf16: keep the UNet's weights (and so its gradients and
    their all-reduce) in that dtype, with fp32 master copies that AdamW updates (NVIDIA's O2). false (the
    reference): fp32 weights under autocast."""
    timeout_s: int = 1800


@dataclass
class TrainingConfig:
    """`training`: batch, precision, loss scaling, stop conditions, checkpoint cadence and resume."""

    micro_batch_size: int = 8
    """Images per GPU per step."""
    grad_accumulation_steps: int = 1
    precision: Precision = "fp16"
    """fp16 autocast + dynamic loss scaling + fp32 master weights is the reference."""
    initial_loss_scale: float = 65536.0
    min_loss_scale: float = 1.0
    loss_scale_window: int = 2000
    """Steps without overflow before the loss scale doubles. The reference (Lightning precision 16)
    uses torch's GradScaler defaults: initial scale 65536, growth interval 2000."""
    max_steps: int | None = None
    max_samples: int | None = None
    checkpoint_every_samples: int = 512000
    """Checkpoint (and evaluate) every CEIL(checkpoint_every_samples / global batch) steps."""
    target_fid: float = 90.0
    target_clip: float = 0.15
    target_toy: dict[str, float] = field(default_factory=dict)
    """Synthetic runs (open division): minimum values of toy metrics that the quality target also needs, e.g.
    {toy_background_acc: 0.6} (names in sd_mlperf/eval/toy_metrics.py). Checked by inline evaluation."""
    stop_at_target: bool = True
    resume: str = "auto"
    """`auto` resumes from the newest complete checkpoint in the run directory, `never`
    starts fresh, anything else is a checkpoint path."""
    cuda_graph: bool = False
    """Capture the whole training step in one CUDA graph (GPU only)."""


@dataclass
class EvalConfig:
    """`eval`: FID and CLIP-score evaluation (DDIM sampling with classifier-free guidance)."""

    inline: bool = True
    """Evaluate at each checkpoint during training (its time counts in run_start..run_stop). false: collect the
    weights (eval_checkpoints/) for `sd-mlperf evaluate --run-dir`, the MLPerf submission path, whose time the
    rules do not count."""
    prompts_file: str = MISSING
    """val2014_30k.tsv (image_id, id, caption)."""
    fid_stats: str = MISSING
    """val2014_30k_stats.npz with mu (2048,) and sigma (2048, 2048)."""
    fid_method: Literal["sqrtm", "eigh"] = "sqrtm"
    """Tr sqrtm(S1 S2) of the FID: `sqrtm` is the reference's scipy sqrtm (slow on the CPU); `eigh` the
    same trace from symmetric eigenvalues in float64 (GPU when present; agrees to about 1e-9 relative)."""
    inception_weights: str | None = MISSING
    """pt_inception-2015-12-05-6726825d.pth; null = random weights (smoke only)."""
    clip_weights: str | None = MISSING
    """open_clip_pytorch_model.bin of ViT-H-14 laion2b_s32b_b79k; null = random (smoke only)."""
    clip_tiny: bool = False
    """Use a tiny CLIP of the same code (smoke tests); the benchmark uses ViT-H-14."""
    num_prompts: int = 30000
    ddim_steps: int = 50
    guidance_scale: float = 8.0
    eta: float = 0.0
    batch_size: int = 8
    """Prompts per GPU per sampling batch."""
    precision: Precision = "fp16"
    seed: int | None = None
    """Seed of the evaluation noise: prompt i starts from the noise of (seed, i), whatever the world and batch
    size. null derives it from run.seed (the logged seed), as the closed division requires."""
    num_grid_images: int = 8


@dataclass
class CheckpointConfig:
    """`checkpoint`: what each checkpoint holds and how many are kept."""

    keep_last: int = 3
    """How many resumable checkpoints (checkpoints/) to keep. The weights collected for offline evaluation
    (eval_checkpoints/, eval.inline=false) are all kept: the rules score them after training."""
    resumable: bool = True
    """Write the resumable checkpoint (weights, AdamW state, RNGs, data position) at every block end. A timed
    closed-division run is never resumed and offline evaluation reads eval_checkpoints/, so the benchmark config
    turns it off: gathering the optimizer state on rank 0 would cost timed seconds at every block."""
    save_optimizer: bool = True
    export_ldm_weights: bool = True
    """Also write the UNet as `model.diffusion_model.*` safetensors for other tools."""
    allow_reshard: bool = False
    """Resume a checkpoint written by another number of data-parallel ranks (parallel.backend=torch).
    Weights, AdamW state, loss scale, step and samples carry over; the noise RNG and the data streams
    restart from (run.seed, rank, step), so the run no longer matches an uninterrupted one."""


@dataclass
class LoggingConfig:
    """`logging`: progress lines, the MLPerf log file and the progress bar."""

    interval_steps: int = 10
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    mlperf_log_file: str = "mlperf.log"
    """MLPerf log, relative to the run directory."""
    progress_bar: Literal["auto", "on", "off"] = "auto"
    """`auto` shows a bar only when stderr is a terminal."""
    tensorboard: bool = False
    """Also write the metrics records and the evaluation grids as TensorBoard events to RUN/tensorboard/ (rank 0;
    needs the `tensorboard` extra: pip install -e '.[tensorboard]')."""


@dataclass
class Config:
    """The root config: one section per concern (see conf/*.yaml for the benchmark and smoke values)."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
