"""A model file as a DistributedDataParallel job: the launcher and failure reports
(`launch`) and the per-rank worker (`worker`)."""
