"""The documented names that rule conditions may read (`field op literal`).

Every rule condition is checked against this registry when rules load: a rule that
reads an unknown field is an error in the rule file, not a silent miss at run time.
A fact whose value is unknown for a run (None) makes every condition on it false.

Producers:
- device.*    autoopt.env (live device) or the trace's deviceProperties (autoopt analyze)
- model.*     autoopt.workload.inspect (inspecting the built module, while autoopt.workload.build builds it)
- workload.*  autoopt.workload.build and .inspect (the model file's contract functions)
- env.*       autoopt.env (global torch settings at run time)
- metrics.*   autoopt.analyze (the Kineto trace) and autoopt.run.measure (timed steps)
- health.*    autoopt.run.health (gradient health on the baseline's verification steps), through
              autoopt.diagnosis.facts_builder.health_facts
"""
from __future__ import annotations

# name -> (type, description). type is one of "bool", "number", "string".
FACTS: dict[str, tuple[str, str]] = {
    # --- device ---
    "device.type": ("string", "'cuda' or 'cpu' (an AMD GPU under ROCm is 'cuda' with device.vendor 'amd')"),
    "device.name": ("string", "device name, e.g. 'NVIDIA H100 80GB HBM3'"),
    "device.vendor": ("string", "'nvidia', 'amd' or '' for a CPU"),
    "device.compute_capability": ("number", "CUDA compute capability as a number, e.g. 8.0 (None on CPU)"),
    "device.memory_mb": ("number", "total device memory in MiB"),
    "device.bf16": ("bool", "fast bf16 math: Ampere+ GPU, or a CPU with AVX-512 BF16 or AMX"),
    "device.fp16": ("bool", "fast fp16 math on tensor cores (Volta+ GPU)"),
    "device.tf32": ("bool", "TF32 tensor cores (Ampere+)"),
    "device.tensor_cores": ("bool", "the GPU has tensor cores (Volta+)"),
    "device.cpu_avx512_bf16": ("bool", "the CPU has AVX-512 BF16"),
    "device.cpu_amx": ("bool", "the CPU has AMX tiles"),
    # --- model (from the built nn.Module) ---
    "model.param_count": ("number", "number of parameters"),
    "model.conv_count": ("number", "number of Conv1d/2d/3d modules"),
    "model.conv2d_count": ("number", "number of Conv2d modules (channels_last applies to these)"),
    "model.linear_count": ("number", "number of Linear modules"),
    "model.rnn_count": ("number", "number of RNN/LSTM/GRU modules"),
    "model.attention_count": ("number", "number of MultiheadAttention modules or scaled_dot_product_attention users"),
    "model.param_dtype": ("string", "dtype of most parameters, e.g. 'float32'"),
    "model.repeated_block_count": ("number", "length of the longest run of identical child modules (checkpointing "
                                             "candidates)"),
    "model.is_data_parallel": ("bool", "the model is wrapped in torch.nn.DataParallel"),
    # --- workload (the model file's contract) ---
    "workload.mode": ("string", "'train' when build_optimizer exists, else 'infer'"),
    "workload.batch_size": ("number", "batch size of the run"),
    "workload.has_dataloader": ("bool", "build_dataloader is defined"),
    "workload.dataloader_workers": ("number", "num_workers of the DataLoader (None without one)"),
    "workload.pin_memory": ("bool", "the DataLoader pins memory"),
    "workload.persistent_workers": ("bool", "the DataLoader keeps workers between epochs"),
    "workload.input_is_4d": ("bool", "the batch holds a 4-D floating-point tensor (image-like)"),
    "workload.static_shapes": ("bool", "every batch has the same shapes"),
    "workload.optimizer": ("string", "optimizer class name, e.g. 'SGD', 'AdamW' ('' without one)"),
    "workload.optimizer_impl": ("string", "'for-loop', 'foreach' or 'fused' (what the optimizer will run)"),
    "workload.autocast": ("bool", "forward() already runs under torch.autocast"),
    "workload.channels_last": ("bool", "the model already uses channels_last"),
    "workload.compiled": ("bool", "build_model already returns a torch.compile'd module"),
    "workload.cpu_count": ("number", "CPU cores available to this process"),
    # --- env (global torch settings) ---
    "env.cudnn_benchmark": ("bool", "torch.backends.cudnn.benchmark"),
    "env.matmul_precision": ("string", "torch.get_float32_matmul_precision(): 'highest', 'high' or 'medium'"),
    "env.anomaly_detection": ("bool", "torch.autograd anomaly detection is on"),
    "env.deterministic": ("bool", "torch.are_deterministic_algorithms_enabled()"),
    "env.cuda_available": ("bool", "torch sees a CUDA device"),
    "env.torch_cuda_build": ("bool", "the installed torch is a CUDA build"),
    "env.nvidia_gpu_present": ("bool", "an NVIDIA GPU is visible to the OS (nvidia-smi or /proc/driver/nvidia)"),
    "env.num_threads": ("number", "torch.get_num_threads()"),
    "env.cpus_busy_other": ("number", "cores' worth of CPU time other processes used just before the run "
                                      "(/proc/stat, sampled while autoopt was idle)"),
    "env.cpus_free": ("number", "cores available to the process, less those other work held and the "
                                "DataLoader's workers (at least 1)"),
    "env.threads_over_free": ("number", "env.num_threads - env.cpus_free: intra-op threads beyond the free cores"),
    # --- metrics: timed steps (autoopt.run.measure) ---
    "metrics.step_time_ms": ("number", "median step time in ms (timed run when present, else the trace's steps)"),
    "metrics.throughput_per_s": ("number", "samples per second of the timed run"),
    "metrics.peak_memory_mb": ("number", "peak memory: allocator peak on GPU, process RSS on CPU, or the trace's "
                                         "memory events"),
    "metrics.memory_fraction": ("number", "peak memory over device memory, 0..1"),
    "metrics.mfu": ("number", "model FLOPs utilization, 0..1, against the device's peak where known"),
    "metrics.step_time_rel_spread": ("number", "interquartile range over median of the timed steps"),
    # --- metrics: trace analysis (autoopt.analyze), per-step means unless said ---
    "metrics.steps": ("number", "number of ProfilerStep spans (0: the whole trace was one window)"),
    "metrics.gpu_utilization": ("number", "torch-tb-profiler's GPU utilization, 0..1"),
    "metrics.sm_efficiency": ("number", "estimated SM efficiency, 0..1"),
    "metrics.achieved_occupancy": ("number", "estimated achieved occupancy, 0..1"),
    "metrics.tensor_core_kernel_ratio": ("number", "share of kernel time in tensor-core kernels, 0..1"),
    "metrics.kernel_fraction": ("number", "breakdown: kernel share of the step, 0..1"),
    "metrics.memcpy_fraction": ("number", "breakdown: memcpy share of the step"),
    "metrics.memset_fraction": ("number", "breakdown: memset share of the step"),
    "metrics.communication_fraction": ("number", "breakdown: communication share of the step"),
    "metrics.runtime_fraction": ("number", "breakdown: CUDA runtime share of the step"),
    "metrics.dataloader_fraction": ("number", "breakdown: DataLoader share of the step"),
    "metrics.cpu_exec_fraction": ("number", "breakdown: CPU execution share of the step"),
    "metrics.other_fraction": ("number", "breakdown: other share of the step"),
    "metrics.matmul_fraction": ("number", "matmul/convolution share of device compute time (CPU op time on CPU)"),
    "metrics.fp32_matmul_fraction": ("number",
                                     "share of matmul/convolution time that runs in fp32 (not tf32/bf16/fp16)"),
    "metrics.conv_fraction": ("number", "convolution share of device compute time"),
    "metrics.layout_conversion_fraction": ("number", "share of kernel time in NCHW<->NHWC conversion kernels"),
    "metrics.kernels_per_step": ("number", "GPU kernels launched per step"),
    "metrics.ops_per_step": ("number", "top-level CPU operators per step of the model's forward and backward "
                                       "(operators inside DataLoader fetches and optimizer.step excluded: they "
                                       "have their own rules)"),
    "metrics.median_kernel_us": ("number", "median kernel duration in microseconds"),
    "metrics.small_kernel_fraction": ("number", "share of kernels shorter than 10 us"),
    "metrics.idle_fraction": ("number", "GPU idle share of the step, 0..1"),
    "metrics.host_wait_fraction": ("number", "idle share spent waiting for the host (HTA's host-wait), 0..1 of the "
                                             "step"),
    "metrics.kernel_wait_fraction": ("number", "idle share between back-to-back launches (HTA's kernel-wait), 0..1 of "
                                               "the step"),
    "metrics.launch_bound": ("bool", "kernel launch time on the CPU exceeds kernel time on the GPU for most kernels"),
    "metrics.sync_count_per_step": ("number",
                                    "host-device synchronisations per step (synchronize, D2H copies, item())"),
    "metrics.host_reads_per_step": ("number", "CPU-only run: item() and other host reads per step, each a "
                                              "host-device synchronisation on a GPU (None on a GPU run)"),
    "metrics.sync_time_fraction": ("number", "share of the step stalled by host-device synchronisation: the blocking "
                                             "calls plus the GPU idle gap each one leaves before the next work"),
    "metrics.data_dependent_ops_per_step": ("number", "nonzero / masked_select / unique calls per step"),
    "metrics.h2d_copies_per_step": ("number", "host-to-device copies per step"),
    "metrics.pageable_h2d_fraction": ("number", "share of host-to-device copy bytes from pageable memory"),
    "metrics.optimizer_fraction": ("number", "share of the step inside optimizer.step"),
    "metrics.optimizer_kernels_per_step": ("number", "kernels launched by optimizer.step per step"),
    "metrics.optimizer_ops_per_step": ("number", "CPU operators run by optimizer.step per step"),
    "metrics.comm_overlap_fraction": ("number", "share of communication kernel time overlapped with compute"),
    "metrics.rank_count": ("number", "number of ranks analyzed together"),
    "metrics.rank_step_skew": ("number", "(slowest - fastest) / fastest rank mean step time"),
    "metrics.comm_backend": ("string", "'nccl', 'gloo', 'mpi' or '' (from distributedInfo or kernel names)"),
    "metrics.dataparallel_ops": ("number", "DataParallel scatter/gather/replicate operators per step"),
    "metrics.dataloader_init_per_step": ("number", "DataLoader iterator/worker creations per step"),
    "metrics.graph_breaks": ("number", "torch.compile graph breaks"),
    "metrics.recompilations": ("number", "torch.compile recompilations"),
    "metrics.nan_or_inf": ("bool", "a loss or output was inf/NaN, or the GradScaler skipped steps"),
    # --- health: gradient health on the verification steps (autoopt.run.health) ---
    "health.steps": ("number", "training steps whose gradients were measured (the verification steps)"),
    "health.grad_norm": ("number", "total gradient norm at the first measured step (unscaled)"),
    "health.grad_norm_growth": ("number", "total gradient norm at the last finite measured step over the first's"),
    "health.layer_grad_spread": ("number", "smallest over largest per-layer gradient norm at the first step, 0..1"),
    "health.vanishing_layer_count": ("number", "layers whose gradient norm is below 1e-6 of the largest layer's"),
    "health.vanishing_layers": ("string", "those layers, input side first (named as in named_parameters())"),
    "health.max_layer_grad_norm": ("number", "largest finite per-layer gradient norm over the measured steps"),
    "health.exploding_layer_count": ("number", "layers whose gradient norm reached 1e3 on a measured step"),
    "health.exploding_layers": ("string", "those layers, largest gradient norm first, with their norms"),
    "health.max_activation_rms": ("number", "the largest output RMS of a layer on the first verification step"),
    "health.first_activation_rms": ("number", "the output RMS of the first layer (input side) on that step"),
    "health.exploding_activation_count": (
        "number", "layers whose output RMS is at least 100 and 100 times the first layer's (activations that grow)"),
    "health.exploding_activations": ("string", "those layers in depth order (where the growth shows first), with RMS"),
    "health.nonfinite_grads": ("number", "inf/NaN gradient elements over the measured steps"),
    "health.first_nonfinite_layer": ("string", "the first layer (input side first) with an inf/NaN gradient"),
    "health.first_nonfinite_step": ("number", "the measured step (1-based) where a gradient was first inf/NaN"),
    "health.grad_scaler": ("bool", "the training step scales the loss with a GradScaler"),
    "health.scaler_skipped_steps": ("number", "measured steps the GradScaler skipped (inf/NaN gradients)"),
    "health.loss_scale": ("number", "the GradScaler's scale at the last measured step"),
    "health.fp16": ("bool", "training runs fp16: fp16 parameters, or autoopt's fp16 autocast"),
    "health.fp16_without_scaler": ("bool", "health.fp16 and no GradScaler"),
    "health.loss_first": ("number", "loss at the first measured step"),
    "health.loss_last": ("number", "loss at the last measured step with a finite loss"),
    "health.loss_growth": ("number", "health.loss_last over health.loss_first (positive losses only)"),
    "health.update_ratio": ("number", "median over layers and steps of ||weight update|| / ||weight||"),
    "health.update_ratio_decades": ("number", "|log10(health.update_ratio / 1e-3)|: decades off the ~1e-3 norm"),
    "health.lr": ("number", "learning rate of the optimizer's first parameter group"),
}


def describe(name: str) -> str:
    kind, text = FACTS[name]
    return f"{name} ({kind}): {text}"
