"""The `sonosynth` command line, recipe loading and orchestration of the stages."""
