"""DreamBooth personalization of text-to-image diffusion models: the library behind the Kubeflow pipelines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dreambooth-kfp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
