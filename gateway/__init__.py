"""The gateway: a policy-as-code access-control gateway for ML inference.

Start it with ``gateway serve`` (see ``gateway --help``). Every call is authenticated by its
client certificate (:mod:`gateway.identity`), authorized by policy (:mod:`gateway.policy`),
served from a verified model (:mod:`gateway.models`, :mod:`gateway.inference`) and recorded
in a tamper-evident audit log (:mod:`gateway.audit`), in that order.
"""

__version__ = "0.1.0"
