"""Code shared by the pipeline stages in ``stages/``."""
