"""Research probes: measurements run on a checkpoint to decide what to try next, not part of
training. `python -m reir.training.probes.context CKPT`, `...probes.neighbours CKPT`,
`...probes.synonyms [CKPT]`."""
