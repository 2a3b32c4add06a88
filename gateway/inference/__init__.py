"""Inference: the Open Inference Protocol tensor codec (plain numpy, no generated code).

The codec reads and writes the OIP messages by attribute only, so this package imports no
gRPC or protobuf code; the servicer that uses it is the serving layer's
(:mod:`gateway.server._oip`).
"""

from gateway.inference._codec import (
    check_batch,
    decode_inputs,
    encode_outputs,
    request_size,
    requested_outputs,
)

__all__ = ["check_batch", "decode_inputs", "encode_outputs", "request_size",
           "requested_outputs"]
