"""Inference: the Open Inference Protocol servicer and its tensor codec.

The servicer lives in :mod:`gateway.inference.service` (it imports the generated OIP code,
so it is imported only by the server); the codec in ``_codec`` is plain numpy.
"""
