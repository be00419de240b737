"""What a run leaves for people: report.md / report.html (`report`), TensorBoard summaries
(`tensorboard`) and the TensorBoard server behind `autoopt view` (`view`). Reads the report's
JSON form only; never runs a model."""
