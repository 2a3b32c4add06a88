"""CPU time per call of the whole gateway process with anomaly scoring on and off, A/B.

    python -m bench.scoring_cpu CONFIG      # one JSON line: {"on": µs, "off": µs, "calls": n}

`bench/detection_bench.py` runs this on two fresh demo deployments: one whose policy needs no
score (scoring runs on the monitor's thread, in the background) and one with the README's
rule on ``anomaly.input_alarm`` (the gateway scores before answering). Like
bench/handler_cost.py it starts the gateway from CONFIG in this process and calls its real
ModelInfer servicer with the demo scorer's certificate, one call at a time. It counts the
process's CPU time (every thread: the audit writer, the monitor's scoring thread), flushes
the scoring queue inside each measured block, and alternates blocks with scoring on and off
(``[monitor] scoring`` switched in place), so both see the same load on this shared machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.handler_cost import _Context
from bench.load import _request
from gateway.config import load_config
from gateway.server import Gateway
from gateway.server._oip import InferenceServicer

BLOCK = 250
BLOCKS = 12
WARMUP = 300


def main(config_path: str) -> None:
    config = load_config(Path(config_path))
    gateway = Gateway.start(config)
    monitor = gateway.monitor
    context = _Context((config.tls.ca.parent / "clients" / "scorer.pem").read_bytes())
    request = _request()  # the very request the load generator sends
    servicer = InferenceServicer(gateway.guard,
                                 max_tensor_elements=config.server.max_tensor_elements)
    for _ in range(WARMUP):
        servicer.ModelInfer(request, context)
    settings = {True: monitor.settings, False: replace(monitor.settings, scoring=False)}
    cpu = {True: 0.0, False: 0.0}
    for block in range(2 * BLOCKS):
        scoring = block % 2 == 0
        monitor.settings = settings[scoring]
        start = time.process_time()
        for _ in range(BLOCK):
            servicer.ModelInfer(request, context)
        monitor.flush()
        cpu[scoring] += time.process_time() - start
    calls = BLOCK * BLOCKS
    print(json.dumps({"on": 1e6 * cpu[True] / calls, "off": 1e6 * cpu[False] / calls,
                      "calls": calls}), flush=True)
    monitor.settings = settings[True]
    gateway.stop()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
