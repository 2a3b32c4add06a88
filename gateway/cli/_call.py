"""`gateway call`: an Open Inference Protocol client for any model, always with its receipt.

    gateway call demo-mlp --as scorer --input 'input=[[0.5, -1, 2, 0.25]]'
    gateway call demo-types --as scorer --example --json
    gateway call my-model --version 3 --input x=@batch.npy --input mask=@mask.json
    gateway call my-model --inputs request.json          # {"x": [[...]], "mask": [...]}
    gateway call demo-mlp --as scorer --action metadata   # or ready

Input datatypes and shapes come from the model's metadata (ModelMetadata, which the caller
must be allowed), so values are given as plain JSON numbers or a .npy array; a value without
the batch dimension gets one when the model's first dimension is dynamic. Outputs print as a
table, or as JSON with --json. Every answer, allowed or denied, names its audit receipt.

Exit codes: 0 answered; 1 denied (PERMISSION_DENIED; the receipt is on stderr); 2 bad
input, unreachable gateway or any other error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from gateway.cli._client import add_client_arguments, connect
from gateway.cli._output import OK, emit_json
from gateway.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from gateway._proto.inference.grpc_service_pb2 import (
        ModelInferRequest,
        ModelInferResponse,
        ModelMetadataResponse,
    )

_EPILOG = ("VALUE is JSON (a number or nested list), @FILE.npy or @FILE.json. Connection: "
           "--as NAME uses the demo identity NAME from the CA's directory (certs/dev/clients); "
           "a [client] section in --config sets target, ca, cert and key instead.")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `call` verb."""
    p = subparsers.add_parser("call", help="call a model over mTLS (OIP); print outputs and "
                              "the audit receipt", epilog=_EPILOG)
    add_call_arguments(p, default_as=None)
    p.set_defaults(func=call)


def add_call_arguments(p: argparse.ArgumentParser, *, default_as: str | None) -> None:
    """The arguments of `gateway call` (also used by `gateway demo call`)."""
    p.add_argument("model", nargs="?", default="demo-mlp",
                   help="model name (default: demo-mlp)")
    p.add_argument("--version", default="", help="model version (default: the latest served)")
    p.add_argument("--action", choices=("infer", "metadata", "ready"), default="infer",
                   help="the RPC: ModelInfer (default), ModelMetadata or ModelReady")
    p.add_argument("-i", "--input", dest="inputs", action="append", default=[],
                   metavar="NAME=VALUE", help="an input tensor by name, repeatable")
    p.add_argument("--inputs", dest="inputs_file", type=Path, metavar="FILE.json",
                   help="a JSON object mapping input names to values")
    p.add_argument("--example", action="store_true",
                   help="fill inputs not given with a small example tensor of the right "
                   "datatype and shape (dynamic dimensions 1)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (outputs and receipt) on stdout")
    add_client_arguments(p, default_as=default_as)


def call(args: argparse.Namespace) -> int:
    """Run one call as the arguments say; print the result and the receipt."""
    from gateway._proto.inference import grpc_service_pb2 as pb
    from gateway._proto.inference import grpc_service_pb2_grpc as pb_grpc
    from gateway.client import Receipt

    given = _given_inputs(args)
    channel, who = connect(args)
    with channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if args.action == "ready":
            reply, rpc = stub.ModelReady.with_call(
                pb.ModelReadyRequest(name=args.model, version=args.version), timeout=60)
            result: dict[str, object] = {"ready": reply.ready}
        else:
            reply, rpc = stub.ModelMetadata.with_call(
                pb.ModelMetadataRequest(name=args.model, version=args.version), timeout=60)
            if args.action == "metadata":
                result = {"versions": list(reply.versions),
                          "inputs": [_spec(t) for t in reply.inputs],
                          "outputs": [_spec(t) for t in reply.outputs]}
            else:
                request = _infer_request(pb, args, reply, given)
                response, rpc = stub.ModelInfer.with_call(request, timeout=300)
                result = {"model_version": response.model_version,
                          "outputs": _outputs(response)}
    receipt = Receipt.from_metadata(rpc.trailing_metadata())
    document = {"identity": who, "model": args.model, "action": args.action, **result,
                "receipt": receipt.to_dict() if receipt else None}
    if args.json:
        emit_json(document)
    else:
        _print_table(document)
    return OK


def _spec(tensor: ModelMetadataResponse.TensorMetadata | ModelInferResponse.InferOutputTensor
          ) -> dict[str, object]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _given_inputs(args: argparse.Namespace) -> dict[str, object]:
    """Input values by name from --inputs and --input (the latter wins)."""
    values: dict[str, object] = {}
    if args.inputs_file is not None:
        loaded = _read_json(args.inputs_file)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.inputs_file}: expected a JSON object of input names "
                              "to values")
        values.update(loaded)
    for item in args.inputs:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--input {item!r}: expected NAME=VALUE (JSON, @FILE.npy or "
                              "@FILE.json)")
        values[name] = _value(raw, f"--input {name}")
    return values


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None


def _value(raw: str, what: str) -> object:
    import numpy as np

    if raw.startswith("@"):
        path = Path(raw[1:])
        if path.suffix == ".npy":
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{what}: cannot read {path} as .npy: {err}") from None
        return _read_json(path)
    try:
        return json.loads(raw)
    except ValueError:
        raise ConfigError(f"{what}: {raw!r} is not JSON (a number or a nested list), "
                          "@FILE.npy or @FILE.json") from None


def _infer_request(pb: ModuleType, args: argparse.Namespace, metadata: ModelMetadataResponse,
                   given: dict[str, object]) -> ModelInferRequest:
    """A ModelInferRequest with each input converted to the model's datatype and shape."""
    import numpy as np

    from gateway.models import NUMPY_DTYPES

    known = [t.name for t in metadata.inputs]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"model {args.model} has no input(s) {', '.join(unknown)}; its "
                          f"inputs: {', '.join(known)}")
    request: ModelInferRequest = pb.ModelInferRequest(model_name=args.model,
                                                      model_version=args.version)
    for spec in metadata.inputs:
        dtype = NUMPY_DTYPES.get(spec.datatype)
        if dtype is None:
            raise ConfigError(f"input {spec.name}: datatype {spec.datatype} is not supported")
        shape = tuple(spec.shape)
        if spec.name in given:
            try:
                array = np.asarray(given[spec.name], dtype=dtype)
            except (TypeError, ValueError) as err:
                raise ConfigError(f"input {spec.name}: not convertible to {spec.datatype}: "
                                  f"{err}") from None
            array = _fit(spec.name, array, shape)
        elif args.example:
            array = _example(dtype, tuple(d if d >= 0 else 1 for d in shape))
        else:
            raise ConfigError(f"input {spec.name} ({spec.datatype}, shape {list(shape)}) is "
                              "missing: give --input NAME=VALUE, --inputs FILE or --example")
        request.inputs.add(name=spec.name, datatype=spec.datatype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def _fit(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``array`` in the model's shape: a missing dynamic batch dimension is added."""
    if array.ndim == len(shape) - 1 and shape and shape[0] < 0:
        array = array[None, ...]
    fits = array.ndim == len(shape) and all(
        want < 0 or want == got for want, got in zip(shape, array.shape, strict=True))
    if not fits:
        raise ConfigError(f"input {name}: shape {list(array.shape)} does not fit the model's "
                          f"{list(shape)} (-1: any size)")
    return array


def _example(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    import numpy as np

    count = int(np.prod(shape)) if shape else 1
    if dtype == np.bool_:
        return (np.arange(count) % 2 == 0).reshape(shape)
    return np.linspace(-1, 1, count).astype(dtype).reshape(shape) if dtype.kind == "f" else \
        (np.arange(count) % 5).astype(dtype).reshape(shape)


def _outputs(response: ModelInferResponse) -> list[dict[str, object]]:
    import numpy as np

    from gateway.models import NUMPY_DTYPES

    out = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        dtype = NUMPY_DTYPES.get(tensor.datatype)
        data: object = None
        if dtype is not None:
            data = np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.shape)).tolist()
        out.append({**_spec(tensor), "data": data})
    return out


def _print_table(doc: dict[str, object]) -> None:
    print(f"{doc['action']} {doc['model']} as {doc['identity']}")
    if "ready" in doc:
        print(f"ready: {str(doc['ready']).lower()}")
    for section in ("inputs", "outputs"):
        table = doc.get(section)
        if not isinstance(table, list) or not table:
            continue
        rows = [(r["name"], r["datatype"], str(r["shape"]),
                 "" if "data" not in r else json.dumps(r["data"])) for r in table]
        header = (section[:-1], "datatype", "shape", "values" if section == "outputs" else "")
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(3)]
        for row in [header, *rows]:
            print("  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row[:3]))
                  + ("  " + row[3] if row[3] else ""))
    receipt = doc.get("receipt")
    if isinstance(receipt, dict) and receipt:
        print(f"audit receipt: record {receipt['index']}, leaf hash {receipt['leaf_hash']}")
    else:
        print("audit receipt: none (the gateway sent no receipt)")
