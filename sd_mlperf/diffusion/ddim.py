"""DDIM sampling with classifier-free guidance for a v-prediction UNet, as the MLPerf reference samples.

The reference (ldm `DDIMSampler`, "uniform" discretisation) uses timesteps range(0, T, T // S) + 1,
so 981, 961, ..., 1 for 50 steps of 1000; alpha of a step is alphas_cumprod[t] and alpha_prev is that
of the next (smaller) timestep, with alphas_cumprod[0] for the last step. One step with guidance s:

    v = v_u + s (v_c - v_u);  eps = sqrt(a) v + sqrt(1-a) x;  x0 = sqrt(a) x - sqrt(1-a) v (no clipping)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z

Initial noise (and the eta > 0 noise) of prompt i comes from a generator seeded by (seed, i), so an
image never depends on the world size, the batch size or the device. Shapes: B batch, C/H/W latent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sd_mlperf.diffusion.schedule import predict_x0_and_eps
from sd_mlperf.models.precision import autocast

# unet(x_BCHW, t_B, context_BLD) -> v_BCHW; a DDP-wrapped module is such a callable too.
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(num_timesteps: int, num_steps: int) -> torch.Tensor:
    """The reference's "uniform" DDIM timesteps, ascending: range(0, T, T // S) + 1 (int64)."""
    if not 0 < num_steps < num_timesteps or num_timesteps % num_steps:
        # The reference's spacing yields another number of steps otherwise, and for S = T its last timestep
        # (T, after the + 1) indexes past alphas_cumprod[T - 1].
        raise ValueError(f"invalid value for 'eval.ddim_steps': {num_steps}; it must divide "
                         f"diffusion.num_timesteps={num_timesteps} and be smaller (e.g. 50, the reference)")
    stride = num_timesteps // num_steps
    return torch.arange(0, num_timesteps, stride, dtype=torch.int64) + 1


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step constants in sampling order (largest timestep first); all tensors have S entries."""

    timesteps: torch.Tensor
    """int64 model timesteps, e.g. 981, 961, ..., 1."""
    alphas: torch.Tensor
    """alphas_cumprod at each timestep (float32)."""
    alphas_prev: torch.Tensor
    """alphas_cumprod of the next, smaller timestep; alphas_cumprod[0] for the last step."""
    sigmas: torch.Tensor
    """eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)); zero for eta = 0."""

    @property
    def num_steps(self) -> int:
        """Number of sampling steps."""
        return int(self.timesteps.numel())


def make_ddim_schedule(alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0) -> DDIMSchedule:
    """DDIM constants from the training schedule, following the reference's alphas_prev rule."""
    if eta < 0:
        raise ValueError(f"invalid value for 'eval.eta': {eta}; must be >= 0 (0 is the reference)")
    acp = alphas_cumprod.detach().to("cpu", torch.float32)
    steps = ddim_timesteps(acp.numel(), num_steps)
    alphas = acp[steps]
    alphas_prev = torch.cat([acp[:1], acp[steps[:-1]]])
    # float64 for the sigma formula (as the reference computes it in numpy), stored as float32.
    a, ap = alphas.double(), alphas_prev.double()
    sigmas = (eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()).float()
    return DDIMSchedule(steps.flip(0), alphas.flip(0), alphas_prev.flip(0), sigmas.flip(0))


def prompt_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit generator seed for prompt `index` under the evaluation `seed`."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


class PromptNoise:
    """One CPU generator per prompt: draws depend only on (seed, prompt index) and the draw order."""

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(prompt_seed(seed, int(i))) for i in indices]

    def draw(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """N(0, 1) of shape (len(indices), *shape), float32, one row per prompt."""
        rows = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(rows).to(device)


def initial_noise(seed: int, indices: Sequence[int], shape: Sequence[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T for the given prompt indices: row i depends only on (seed, indices[i])."""
    return PromptNoise(seed, indices).draw(shape, device)


def guided_v(unet: UNetFn, x_BCHW: torch.Tensor, t_B: torch.Tensor, cond_BLD: torch.Tensor,
             uncond_BLD: torch.Tensor | None, guidance_scale: float) -> torch.Tensor:
    """v = v_u + s (v_c - v_u) with one batched UNet call; scale 1 (or no uncond) is the conditional model."""
    if uncond_BLD is None or guidance_scale == 1.0:
        return unet(x_BCHW, t_B, cond_BLD).float()
    x_in = torch.cat([x_BCHW, x_BCHW])
    t_in = torch.cat([t_B, t_B])
    ctx = torch.cat([uncond_BLD.expand_as(cond_BLD), cond_BLD])
    v_u, v_c = unet(x_in, t_in, ctx).float().chunk(2)
    return v_u + guidance_scale * (v_c - v_u)


def ddim_step(x_BCHW: torch.Tensor, v_BCHW: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor,
              sigma: torch.Tensor, noise_BCHW: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from a v-prediction; returns (x_prev, x0). Math in fp32."""
    x0, eps = predict_x0_and_eps(x_BCHW, v_BCHW, a_t)
    x_prev = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).sqrt() * eps
    if noise_BCHW is not None:
        x_prev = x_prev + sigma * noise_BCHW
    return x_prev, x0


@torch.no_grad()
def ddim_sample(unet: UNetFn, x_T: torch.Tensor, cond_BLD: torch.Tensor, uncond_BLD: torch.Tensor | None,
                schedule: DDIMSchedule, *, guidance_scale: float = 8.0, noise: PromptNoise | None = None,
                precision: str = "fp32", callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run DDIM from x_T; returns the last step's x_prev (the reference's sample). Latents stay fp32."""
    x = x_T.float()
    batch = x.shape[0]
    has_noise = bool((schedule.sigmas > 0).any())
    if has_noise and noise is None:
        raise ValueError("eval.eta > 0 needs per-prompt noise generators (pass noise=PromptNoise(...))")
    device = x.device
    # Moved once: a host-to-device copy per step would block the host on the GPU (a stream sync) every step.
    timesteps, alphas, alphas_prev, sigmas = (s.to(device) for s in (schedule.timesteps, schedule.alphas,
                                                                     schedule.alphas_prev, schedule.sigmas))
    for i in range(schedule.num_steps):
        t_B = timesteps[i].expand(batch)
        with autocast(precision, device):
            v = guided_v(unet, x, t_B, cond_BLD, uncond_BLD, guidance_scale)
        a_t, a_prev, sigma = alphas[i], alphas_prev[i], sigmas[i]
        z = noise.draw(x.shape[1:], device) if has_noise else None
        x, _ = ddim_step(x, v.float(), a_t, a_prev, sigma, z)
        if callback is not None:
            callback(i, x)
    return x
