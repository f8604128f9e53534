"""The only package that imports Ray: Ray Data actor pools, Ray tasks, Ray Train, Ray Tune."""
