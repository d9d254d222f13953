"""GPU fast-path helpers, each with a plain-PyTorch twin that runs (and is tested) on the CPU.

- `cuda_graph.build_step_runner`: the whole training step replayed from one CUDA graph, after a
  warmup that changes no weights; eager on the CPU (same warmup). The trainer uses it through
  `sd_mlperf.train_step.GraphedTrainStep` when `training.cuda_graph=true`.
- `optim.adamw_kernel_options` / `optim.make_capturable`: fused AdamW, capturable for a graph.
- `compile.compile_available`: whether torch.compile can generate code on this device.
- `runtime.configure_device`: cuDNN autotuning, decided once at start-up.

channels-last and torch.compile of the UNet are applied by `models.unet.build_unet` from
`model.unet.channels_last` / `model.unet.compile` (one implementation, in the model package).
"""
