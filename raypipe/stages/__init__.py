"""The RLAP stages. Each is a function from input URI(s) + its config to output URI(s); the
per-shard work functions here are pure and run wherever an executor sends them (this process, or
Ray tasks / actors). Stages never hand live objects to each other, only files under the run."""
