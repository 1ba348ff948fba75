"""The processes a user runs: serving daemon, trainer, health server, the `swarm` CLI."""
