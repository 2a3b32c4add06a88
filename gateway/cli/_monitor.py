"""`gateway monitor`: a live terminal summary per model and per caller, from /metrics.

    gateway monitor                         # redraw every second until Ctrl-C
    gateway monitor --once --url http://127.0.0.1:9464/metrics

It reads only the Prometheus endpoint, so it needs no credentials beyond network access to
the metrics listener (which binds to loopback by default) and never touches the gateway.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from gateway.errors import GatewayError

_CLEAR = "\x1b[H\x1b[2J"


class MonitorUnavailable(GatewayError):
    """The metrics endpoint cannot be read."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `monitor` verb."""
    p = subparsers.add_parser(
        "monitor", help="live terminal summary per model and per caller",
        description="Read the gateway's Prometheus endpoint and show requests, decisions, "
                    "latency, anomaly alarms and quotas per model and per caller.")
    p.add_argument("--url", help="metrics URL (default: from [monitor] metrics_listen)")
    p.add_argument("--config", type=Path, help="gateway config file (for the default URL)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws")
    p.set_defaults(func=_monitor)


def _default_url(config: Path | None) -> str:
    from gateway.config import load_config

    listen = load_config(config).monitor.metrics_listen
    if not listen:
        raise MonitorUnavailable("the metrics listener is disabled ([monitor] metrics_listen "
                                 "is empty); give --url")
    host, _, port = listen.rpartition(":")
    if port == "0":
        raise MonitorUnavailable("metrics_listen uses an ephemeral port (0); give --url")
    return f"http://{host}:{port}/metrics"


def fetch(url: str, timeout: float = 5.0) -> str:
    """The exposition text at ``url`` (http/https only)."""
    if not url.startswith(("http://", "https://")):
        raise MonitorUnavailable(f"{url}: expected an http:// or https:// URL")
    import urllib.error  # here, not at the top: `gateway --help` need not load http.client
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked)
            return resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as err:
        raise MonitorUnavailable(f"cannot read metrics from {url}: {err}; is the gateway "
                                 "running, and is this its [monitor] metrics_listen?") from err


def summarise(text: str) -> str:
    """Render one snapshot of the exposition ``text`` as a table (what ``--once`` prints)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as err:
        raise MonitorUnavailable(f"the endpoint did not return Prometheus text: {err}") from err
    samples = [s for fam in families for s in fam.samples]

    def each(name: str):  # type: ignore[no-untyped-def]
        return ((s.labels, s.value) for s in samples if s.name == name)

    lines: list[str] = []
    digest = next((lab["digest"] for lab, v in each("gateway_policy_info") if v), "-")
    ok = next((v for _, v in each("gateway_policy_last_reload_success")), None)
    entries = next((v for _, v in each("gateway_audit_log_entries")), None)
    age = next((v for _, v in each("gateway_audit_checkpoint_age_seconds")), None)
    lines.append(f"policy {digest[:32]}  last reload "
                 f"{'-' if ok is None else ('ok' if ok else 'FAILED')}   audit entries "
                 f"{'-' if entries is None else int(entries)}  checkpoint age "
                 f"{'-' if age is None else f'{age:.0f}s'}")
    sums = dict((lab["stage"], v) for lab, v in each("gateway_request_stage_duration_seconds_sum"))
    counts = dict((lab["stage"], v)
                  for lab, v in each("gateway_request_stage_duration_seconds_count"))
    lat = "  ".join(f"{st} {1000 * sums[st] / counts[st]:.2f}ms" for st in
                    ("decision", "inference", "audit", "total") if counts.get(st))
    lines.append(f"mean latency  {lat or '-'}")

    models: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for lab, v in each("gateway_requests_total"):
        m = models[f"{lab['model']}/{lab['version']}" if lab["version"] else lab["model"] or "-"]
        m["requests"] += v
        m["allow" if lab["decision"] == "allow" else "deny"] += v
        if lab["status"] != "OK":
            m["errors"] += v
    for lab, v in each("gateway_anomaly_detections_total"):
        if lab["model"]:
            models[lab["model"]][lab["kind"]] += v
    for name, key in (("gateway_output_drift_psi", "psi"),
                      ("gateway_output_drift_psi_threshold", "psi_thr")):
        for lab, v in each(name):
            models[lab["model"]][key] = v
    for lab, v in each("gateway_latency_baseline_ratio"):
        models[f"{lab['model']}/{lab['version']}"]["lat_ratio"] = v
    for lab, v in each("gateway_model_signature_valid"):
        models[f"{lab['model']}/{lab['version']}"]["sig"] = v + 1  # 0: unknown
    lines.append("")
    lines.append(f"{'MODEL':<28}{'REQS':>8}{'ALLOW':>8}{'DENY':>7}{'ERR':>6}{'INPUT!':>8}"
                 f"{'BOUNDS!':>8}{'EXTRACT!':>9}{'PSI/THR':>14}{'LATx':>7}{'SIG':>5}")
    for name in sorted(models):
        m = models[name]
        psi = f"{m['psi']:.3f}/{m['psi_thr']:.3f}" if "psi" in m else "-"
        lat = f"{m['lat_ratio']:.2f}" if "lat_ratio" in m else "-"
        sig = {0: "-", 1: "BAD", 2: "ok"}[int(m.get("sig", 0))]
        lines.append(f"{name[:27]:<28}{int(m['requests']):>8}{int(m['allow']):>8}"
                     f"{int(m['deny']):>7}{int(m['errors']):>6}{int(m['input']):>8}"
                     f"{int(m['bounds']):>8}{int(m['extraction']):>9}{psi:>14}{lat:>7}{sig:>5}")

    callers: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for lab, v in each("gateway_caller_requests_total"):
        callers[lab["caller"]][lab["outcome"]] += v
    for name, key in (("gateway_caller_rate_ratio", "rate"),
                      ("gateway_caller_extraction_alarm", "extraction"),
                      ("gateway_caller_input_alarms_total", "input")):
        for lab, v in each(name):
            callers[lab["caller"]][key] = v
    lines.append("")
    lines.append(f"{'CALLER':<48}{'ADMITTED':>9}{'REJECTED':>9}{'RATEx':>8}{'INPUT!':>8}"
                 f"{'EXTRACTION':>11}")
    ranked = sorted(callers, key=lambda c: (-callers[c].get("extraction", 0),
                                            -callers[c].get("rate", 0), c))
    for name in ranked:
        c = callers[name]
        rate = f"{c['rate']:.2f}" if "rate" in c else "-"
        lines.append(f"{name[-47:]:<48}{int(c['admitted']):>9}{int(c['rejected']):>9}"
                     f"{rate:>8}{int(c['input']):>8}"
                     f"{'ALARM' if c['extraction'] else '-':>11}")
    return "\n".join(lines)


def _monitor(args: argparse.Namespace) -> int:
    url = args.url or _default_url(args.config)
    if args.interval <= 0:
        raise MonitorUnavailable("--interval must be positive")
    if args.once:
        print(summarise(fetch(url)))
        return 0
    try:
        while True:
            snapshot = summarise(fetch(url))
            sys.stdout.write(f"{_CLEAR}gateway monitor  {url}  {time.strftime('%H:%M:%S')}"
                             f"  (Ctrl-C to quit)\n\n{snapshot}\n")
            sys.stdout.flush()
            time.sleep(args.interval)  # a display refresh, not synchronisation
    except KeyboardInterrupt:
        return 0
