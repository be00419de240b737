"""The model file and what it is bound to: loading and checking the contract (`load`), the
calls into the user's functions (`contract`), and the Workload with its model.* and
workload.* facts."""
