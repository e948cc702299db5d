"""Artifact file names and format tags: importable without torch (Ray drivers, storage helpers)."""

FORMAT = "adistill-adapter"
FORMAT_VERSION = 1
WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
FILES = (WEIGHTS, CONFIG)  # in publish order: the config last, its presence means the files are complete
