"""What a run leaves for people: report.md / report.html (`report`, the facade over
`markdown`, `html` with its Jinja2 `templates/`, `plots`, `terminal`, `data` and `format`),
TensorBoard summaries (`tensorboard`) and the TensorBoard server behind `autoopt view`
(`view`). Reads the report's JSON form only; never runs a model."""
