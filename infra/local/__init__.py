"""A local cluster stack on one machine: a Ray head (dashboard and job server), an MLflow
server (SQLite backend, artifacts in S3) and an S3-compatible server (moto_server), each its
own process with its pid and log in a state folder. ``sonosynth stack up|down|status``."""
