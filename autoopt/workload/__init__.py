"""The model file and what it is bound to: loading and checking the contract (`load`), the
calls into the user's functions (`contract`), building the Workload on a device (`build`)
and its model.* and workload.* facts (`inspect`)."""
