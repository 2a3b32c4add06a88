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

Across replicas, which versions are loaded is desired state (:mod:`gateway.state`, topic
``MODELS_TOPIC``, key :func:`model_key`, payload :func:`model_change`): every replica applies
a change with :meth:`ModelRepository.apply_change`, verifying its own copy of the files.
"""

from gateway.models._datatypes import NUMPY_DTYPES
from gateway.models._files import FileData
from gateway.models._metadata import repository_attributes
from gateway.models._pipeline import Verify, runtime_from_dir
from gateway.models._repository import (
    LOAD,
    LOADED,
    MODELS_TOPIC,
    REFUSED,
    UNLOAD,
    UNLOADED,
    LoadedModel,
    ModelEntry,
    ModelRepository,
    TensorSpec,
    model_change,
    model_key,
)

__all__ = [
    "LOAD",
    "LOADED",
    "MODELS_TOPIC",
    "NUMPY_DTYPES",
    "REFUSED",
    "UNLOAD",
    "UNLOADED",
    "FileData",
    "LoadedModel",
    "ModelEntry",
    "ModelRepository",
    "TensorSpec",
    "Verify",
    "model_change",
    "model_key",
    "repository_attributes",
    "runtime_from_dir",
]
