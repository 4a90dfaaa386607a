"""Command-line entry points: flag parsing, one-line errors, and the commands run with
`python -m bitnet_jax.cli.<name>`."""
