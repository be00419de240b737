"""The commands' pipelines, each a sequence of stages: `profile` (autoopt profile MODEL),
`optimize` (autoopt optimize), `script` (autoopt profile --script) and `export`
(autoopt export)."""
