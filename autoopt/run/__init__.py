"""Running one configuration of a workload: the applier that turns an ExecConfig into torch
settings, a model, an optimizer, a loader and a training step (`apply`), the Session that
holds them (`session`), timed measurement (`measure`), torch.profiler tracing (`trace`) and
numerical verification (`verify`)."""
