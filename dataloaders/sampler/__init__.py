"""The global sample order of a dataset and how ranks and workers split it."""
