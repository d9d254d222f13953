"""Diffusion math: the noise schedule, v-objective, and the DDIM sampler."""
