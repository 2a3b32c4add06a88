"""Monitoring and anomaly detection: metrics, per-caller quotas, and anomaly scores as attributes.

    monitor = Monitor(config.monitor)
    monitor.start_http()                                   # GET http://127.0.0.1:9464/metrics
    monitor.admit(caller, roles)                           # QuotaExceeded past the token bucket
    attrs = monitor.score("iris/1", profile, caller, x)    # {"anomaly.input_score": ..., ...}
    ...                                                     # policy decides with attrs
    monitor.observe_output("iris/1", y)
    for alert in monitor.alerts(): audit.append("anomaly", alert.as_fields())

The scores are ABAC attributes of the request, so policy can act on them (for example, deny
``infer`` on a sensitive model when ``anomaly.input_alarm`` or ``anomaly.extraction_alarm`` is
set), and every alarm becomes an :class:`Alert` the server writes to the audit log. Every
threshold is calibrated on held-out reference data at a configured false-positive rate (see
:class:`InputProfile`), not taken from folklore. All state is bounded (LRU per caller, fixed
windows) and every method is thread-safe and cheap enough for the request path.
"""

from gateway.monitor._alerts import Alert
from gateway.monitor._metrics import MetricsServer
from gateway.monitor._monitor import Monitor
from gateway.monitor._profile import InputProfile, OutputProfile, ProfileError
from gateway.monitor._profile_file import PROFILE_FILE, load_profile, verified_profile
from gateway.monitor._settings import MonitorSettings

__all__ = ["PROFILE_FILE", "Alert", "InputProfile", "MetricsServer", "Monitor",
           "MonitorSettings", "OutputProfile", "ProfileError", "load_profile",
           "verified_profile"]
