"""Shared material for the signing and encryption tests (no tests here): keys, PKI, ONNX."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import onnx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from onnx import TensorProto, helper, numpy_helper


def write_key(directory: Path, stem: str, curve: ec.EllipticCurve | None = None
              ) -> tuple[Path, Path]:
    """A fresh EC key pair as (private PEM, public PEM)."""
    key = ec.generate_private_key(curve or ec.SECP256R1())
    private, public = directory / f"{stem}.key", directory / f"{stem}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def write_pki(directory: Path, stem: str = "org", email: str = "release@example.com",
              code_signing: bool = True) -> dict[str, Path]:
    """A CA and a signing certificate (KU digitalSignature, EKU codeSigning, SAN e-mail)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"{stem} CA"))
          .issuer_name(_name(f"{stem} CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    eku = ExtendedKeyUsageOID.CODE_SIGNING if code_signing else ExtendedKeyUsageOID.SERVER_AUTH
    leaf = (x509.CertificateBuilder().subject_name(_name("release-bot")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / f"{stem}-ca.pem", "cert": directory / f"{stem}-signer.pem",
             "key": directory / f"{stem}-signer.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def write_model(directory: Path, external: bool = False) -> Path:
    """A tiny ONNX model (Y = X @ W + B) in ``directory``; W/B in ``weights.bin`` if external."""
    directory.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    b = numpy_helper.from_array(np.ones(3, dtype=np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]),
         helper.make_node("Add", ["XW", "B"], ["Y"])],
        "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(model, str(directory / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    else:
        onnx.save_model(model, str(directory / "model.onnx"))
    (directory / "metadata.toml").write_text('owner = "team-a"\nlabels = ["demo"]\n')
    return directory


#: ``write_large_model``'s weight shape: just over the 16 MiB from which files are staged.
LARGE_MODEL_SHAPE = (4, (16 << 20) // 16 + 1024)


def write_large_model(directory: Path, *, extra: TensorProto | None = None) -> np.ndarray:
    """``y = x @ w`` with ``w`` (over 16 MiB) in ``weights.bin`` at offset 64; returns w."""
    directory.mkdir(parents=True)
    w = np.random.default_rng(7).normal(size=LARGE_MODEL_SHAPE).astype(np.float32)
    (directory / "weights.bin").write_bytes(b"\1" * 64 + w.tobytes())
    t = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(w.shape),
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "64"),
                       ("length", str(w.nbytes))):
        t.external_data.add(key=key, value=value)
    rows, cols = LARGE_MODEL_SHAPE
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    inits = [t]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cols])]
    if extra is not None:
        inits.append(extra)
        nodes.append(helper.make_node("Identity", [extra.name], ["leak"]))
        outputs.append(helper.make_tensor_value_info("leak", extra.data_type, list(extra.dims)))
    graph = helper.make_graph(nodes, "staged",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    return w
