"""`gateway model scan` and `gateway model test`: admission scan and robustness tests.

    gateway model scan MODEL_DIR [--json] [--config FILE]
    gateway model test MODEL_DIR [--report out.json] [--config FILE]

MODEL_DIR is a model version directory (holding model.onnx), a model directory of versions,
or a whole repository; every model.onnx at most two levels below it is scanned. Exit status:
0 when nothing is refused (or every test passed), 1 when a model is refused (or a test
failed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError


def register(verbs: argparse._SubParsersAction) -> None:
    """Add `scan` and `test` to the `model` group."""
    scan = verbs.add_parser("scan", help="admission-scan ONNX models for hostile content",
                            description="Scan model version directories the way the gateway "
                            "does before loading them; exit 1 if any is refused.")
    scan.add_argument("model_dir", metavar="MODEL_DIR", type=Path)
    scan.add_argument("--json", action="store_true", help="print the reports as JSON")
    scan.add_argument("--config", type=Path, help="gateway config whose [scan] table to use")
    scan.set_defaults(func=_scan)

    test = verbs.add_parser("test", help="run a model on edge inputs under limits",
                            description="Run the model on NaN, infinities, dtype extremes, zeros "
                            "and the largest batch in a contained process, check determinism "
                            "and report sensitivity; exit 1 on a failure.")
    test.add_argument("model_dir", metavar="MODEL_DIR", type=Path)
    test.add_argument("--report", type=Path, help="write the JSON report here")
    test.add_argument("--config", type=Path,
                      help="gateway config whose [scan] and [robustness] tables to use")
    test.set_defaults(func=_test)


def _table(config: Path | None, name: str, cls: type) -> Any:
    """The ``[name]`` settings of ``config`` (the built-in defaults without one)."""
    from gateway.config import load_config

    return cls() if config is None else getattr(load_config(config), name)


def _version_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise GatewayError(f"{root}: not a directory")
    if (root / "model.onnx").exists() or (root / "model.onnx").is_symlink():
        return [root]
    found = sorted({p.parent for pattern in ("*/model.onnx", "*/*/model.onnx")
                    for p in root.glob(pattern)})
    if not found:
        raise GatewayError(f"{root}: no model.onnx in it or up to two levels below")
    return found


def _scan(args: argparse.Namespace) -> int:
    from gateway.models.scan import ScanSettings, scan_model

    settings = _table(args.config, "scan", ScanSettings)
    reports = [scan_model(d, settings) for d in _version_dirs(args.model_dir)]
    refused = any(r.refused for r in reports)
    if args.json:
        json.dump({"refused": refused, "models": [r.to_json() for r in reports]}, sys.stdout,
                  indent=2, sort_keys=True)
        print()
    else:
        for r in reports:
            verdict = "REFUSED" if r.refused else "ok"
            print(f"{r.path}: {verdict}")
            for f in r.sorted_findings():
                print(f"  {f.severity:<6} {f.code}: {f.file}: {f.message}")
    return 1 if refused else 0


def _test(args: argparse.Namespace) -> int:
    from gateway.models.robustness import RobustnessSettings, run_model_tests
    from gateway.models.scan import ScanSettings

    scan_settings = _table(args.config, "scan", ScanSettings)
    settings = _table(args.config, "robustness", RobustnessSettings)
    dirs = _version_dirs(args.model_dir)
    reports = [run_model_tests(d, settings, scan_settings=scan_settings) for d in dirs]
    failed = any(not r["passed"] for r in reports)
    document = reports[0] if len(reports) == 1 else {"passed": not failed, "models": reports}
    if args.report is not None:
        args.report.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")
    for r in reports:
        print(f"{r['path']}: {'passed' if r['passed'] else 'FAILED'}")
        for problem in r["failures"]:
            print(f"  fail: {problem}")
        sens = r.get("sensitivity") or {}
        if sens.get("max_gain") is not None:
            print(f"  sensitivity: max output change / input change = {sens['max_gain']:.3g}")
    return 1 if failed else 0
