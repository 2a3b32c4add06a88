"""Models: the repository of verified ONNX Runtime sessions the gateway serves.

    from gateway.models import ModelRepository
    repo = ModelRepository(Path("models"), session_options=..., verify=...)
    repo.load_all()
    model = repo.get("demo-mlp")          # newest loaded version, or None
    outputs = model.run({"input": x}, [])

Layout: ``<repository>/<name>/<version>/`` holds ``model.onnx``, ``metadata.toml`` (owner and
labels, the model's ABAC attributes), optional external-data files and ``profile.json``, and
``model.sig`` (the OpenSSF Model Signing bundle over the directory). Signing lives in
:mod:`gateway.models.signing`, encryption at rest in :mod:`gateway.models.encryption`, the
admission scanner in :mod:`gateway.models.scan`.
"""

from gateway.models._datatypes import NUMPY_DTYPES
from gateway.models._files import FileData
from gateway.models._metadata import repository_attributes
from gateway.models._pipeline import runtime_from_dir
from gateway.models._repository import (
    LOADED,
    REFUSED,
    UNLOADED,
    LoadedModel,
    ModelEntry,
    ModelRepository,
    TensorSpec,
)

__all__ = [
    "LOADED",
    "NUMPY_DTYPES",
    "REFUSED",
    "UNLOADED",
    "FileData",
    "LoadedModel",
    "ModelEntry",
    "ModelRepository",
    "TensorSpec",
    "repository_attributes",
    "runtime_from_dir",
]
