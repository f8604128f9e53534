"""The only package that imports Ray: Ray tasks and actors, Ray Train, Ray Tune."""
