"""`gateway policy check|test|explain|diff|fmt|push`: the policy toolchain for security teams.

    gateway policy check policies [--strict] [--json]
    gateway policy test policies [policies/tests/*.yaml] [-v] [--json]
    gateway policy explain policies --as spiffe://demo.local/svc/scorer --model demo-mlp \\
        --action infer [--models models] [--attr model.labels.stage=retired] [--json]
    gateway policy diff HEAD~1 policies [--json]  # directories or git revisions
    gateway policy fmt policies [--check] [--diff]
    gateway policy push policies [--dsn DSN | --config FILE] [--comment TEXT] [--strict]

Exit codes: 0 success; 1 a finding (a warning under --strict, a failed case, a denied
request in explain, an unformatted file under --check, changed access under --exit-code, a
failed case or warning under --strict that stopped a push);
2 bad input, printed as ``file:line: problem`` lines (paths relative to the working directory).
The live-gateway verbs (reload, show, shadow, shadow-report) are in :mod:`._policy_admin`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli._output import ERROR, FAILED, OK, emit_json, shown, warn

if TYPE_CHECKING:
    # The policy package is imported by the handlers: building the `gateway` parser (and
    # `gateway --help`, and the other verb groups) does not load it.
    from gateway.policy import PolicyError, Snapshot

_INT = re.compile(r"-?[0-9]+\Z")
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+\Z")


class _ActionsHelp(argparse.HelpFormatter):
    """Fills ``{actions}`` in a help text with the policy's actions when help is printed,
    so that registering `policy explain` does not import the policy package."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text is None or "{actions}" not in text:
            return text
        from gateway.policy import ACTIONS

        return text.replace("{actions}", ", ".join(ACTIONS))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `policy` verb group."""
    parser = subparsers.add_parser("policy", help="check, test, explain, diff and format "
                                   "policy; reload, show and shadow it on a live gateway")
    verbs = parser.add_subparsers(dest="policy_command", metavar="VERB", required=True)
    directory_help = "policy directory holding model.conf and policy.csv"
    json_help = "print one JSON document on stdout instead of text"

    p = verbs.add_parser("check", help="validate the policy and its cases (every error, with "
                         "file and line) and warn about logic mistakes")
    p.add_argument("directory", type=Path, help=directory_help)
    p.add_argument("--strict", action="store_true", help="exit 1 if there is any warning")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_check)

    p = verbs.add_parser("test", help="run YAML test cases; report failures and rules no "
                         "case exercised")
    p.add_argument("directory", type=Path, help=directory_help)
    p.add_argument("cases", type=Path, nargs="*",
                   help="case files (default: DIRECTORY/tests/*.yaml)")
    p.add_argument("-v", "--verbose", dest="list_cases", action="store_true",
                   help="list every case with its decision and deciding rule")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_test)

    p = verbs.add_parser("explain", help="why a request is allowed or denied (exit 1: denied)",
                         formatter_class=_ActionsHelp)
    p.add_argument("directory", type=Path, help=directory_help)
    p.add_argument("--as", dest="subject", required=True, metavar="ID",
                   help="caller SPIFFE ID, cn:NAME or role")
    p.add_argument("--model", default="", help="model name ('' for gateway-level actions, "
                   "decided on the object @gateway)")
    p.add_argument("--version", default=None, help="model version (sets model.version)")
    p.add_argument("--action", required=True, help="one of: {actions}")
    p.add_argument("--models", type=Path, default=None, metavar="DIR",
                   help="model repository: take the model's owner and labels from "
                   "DIR/<model>/<version>/metadata.toml, as the server would")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="request/model/caller attribute, repeatable (overrides --models)")
    p.add_argument("--trace", action="store_true",
                   help="also list every rule, whether it matches and why not")
    p.add_argument("--json", action="store_true", help=json_help + " (always with the trace)")
    p.set_defaults(func=_explain)

    p = verbs.add_parser("diff", help="the access that changes between two policies")
    p.add_argument("old", help="directory or git revision")
    p.add_argument("new", help="directory or git revision")
    p.add_argument("--path", default="policies",
                   help="policy directory inside the git tree, for revisions (default policies)")
    p.add_argument("--models", type=Path, default=Path("models"),
                   help="model repository whose models (and their metadata labels) join "
                   "the comparison (default: models)")
    p.add_argument("--as", dest="subjects", action="append", default=[], metavar="ID",
                   help="extra identity to compare, repeatable")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="attributes every compared request carries, repeatable")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when access changes")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_diff)

    p = verbs.add_parser("fmt", help="rewrite model.conf and policy.csv canonically")
    p.add_argument("directory", type=Path, help=directory_help)
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a file is not canonical")
    p.add_argument("--diff", action="store_true",
                   help="change nothing; print a unified diff of what fmt would change "
                   "(exit 1 if there is one)")
    p.set_defaults(func=_fmt)

    p = verbs.add_parser("push", help="check and test a policy directory, then publish it "
                         "to PostgreSQL as a new version for every replica (atomically)")
    p.add_argument("directory", type=Path, help=directory_help)
    p.add_argument("--dsn", default="", help="PostgreSQL DSN (default: [policy] dsn of "
                   "--config, else $GATEWAY_DSN)")
    p.add_argument("--config", metavar="FILE", help="gateway configuration naming the DSN")
    p.add_argument("--comment", default="", help="note stored with the version")
    p.add_argument("--strict", action="store_true", help="refuse on any warning too")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=_push)

    from gateway.cli import _policy_admin

    _policy_admin.register(verbs)


# --- shared ------------------------------------------------------------------------------


def locator(directory: Path) -> Callable[[str], str]:
    """``policy.csv:N`` -> ``<directory>/policy.csv:N`` as shown from the working directory."""
    from gateway.policy import MODEL_FILE, POLICY_FILE

    base = shown(directory)

    def where(text: str) -> str:
        if text.startswith((POLICY_FILE, MODEL_FILE)):
            return f"{base}/{text}"
        return text

    return where


def _relocated(err: PolicyError, directory: Path) -> PolicyError:
    from gateway.policy import PolicyError, Problem

    where = locator(directory)
    return PolicyError([Problem(where(p.file), p.line, p.message) for p in err.problems])


def compile_here(directory: Path) -> Snapshot:
    """Compile ``directory`` without its cases; problems located from the working dir."""
    from gateway.policy import PolicyError, compile_directory

    try:
        return compile_directory(directory, run_tests=False)
    except PolicyError as err:
        raise _relocated(err, directory) from None


def _attributes(pairs: list[str]) -> dict[str, object]:
    from gateway.policy import ATTRIBUTE_PREFIXES, PolicyError, attribute_problem

    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.startswith(ATTRIBUTE_PREFIXES):
            raise PolicyError(f"--attr {pair!r}: expected KEY=VALUE with KEY under "
                              + ", ".join(ATTRIBUTE_PREFIXES))
        problem = attribute_problem(key)
        if problem is not None:
            raise PolicyError(f"--attr {pair!r}: {problem}")
        value: object = raw
        if _INT.match(raw):
            value = int(raw)
        elif _FLOAT.match(raw):
            value = float(raw)
        elif raw in ("true", "false"):
            value = raw == "true"
        out[key] = value
    return out


def _problems_json(err: PolicyError) -> list[dict[str, object]]:
    return [{"file": p.file, "line": p.line, "message": p.message} for p in err.problems]


# --- check -------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from gateway.policy import POLICY_FILE, PolicyError, case_files, lint, load_cases

    try:
        snapshot = compile_here(args.directory)
        files = [Path(shown(f)) for f in case_files(args.directory)]
        try:
            cases = load_cases(files, snapshot)
        except PolicyError as err:
            raise _relocated(err, args.directory) from None
    except PolicyError as err:
        if not args.json:
            raise
        emit_json({"directory": shown(args.directory), "ok": False,
                   "errors": _problems_json(err), "warnings": []})
        return ERROR
    where = locator(args.directory)
    findings = lint(snapshot, lambda line: where(f"{POLICY_FILE}:{line}"))
    source = snapshot.source
    failed = bool(findings) and args.strict
    if args.json:
        emit_json({"directory": shown(args.directory), "ok": not failed,
                   "digest": snapshot.digest, "rules": len(source.rules),
                   "role_links": len(source.links), "cases": len(cases),
                   "case_files": [shown(f) for f in files], "errors": [],
                   "warnings": [{"file": where(POLICY_FILE), "line": f.line, "kind": f.kind,
                                 "message": f.message,
                                 "other": None if f.other is None else
                                 where(f"{POLICY_FILE}:{f.other}")}
                                for f in findings]})
        return FAILED if failed else OK
    for f in findings:
        print(f"{where(POLICY_FILE)}:{f.line}: warning: {f.message} [{f.kind}]")
    status = "ok" if not findings else f"{len(findings)} warning(s)"
    print(f"{shown(args.directory)}: {status}: {len(source.rules)} rules, "
          f"{len(source.links)} role links, {len(cases)} test cases in {len(files)} file(s); "
          f"digest {snapshot.digest}")
    return FAILED if failed else OK


# --- test --------------------------------------------------------------------------------


def _test(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError, case_files, load_cases, run_cases

    snapshot = compile_here(args.directory)
    files = [Path(shown(f)) for f in args.cases or case_files(args.directory)]
    if not files:
        raise PolicyError(f"{shown(args.directory)}: no test cases given and none in tests/")
    cases = load_cases(files, snapshot)
    report = run_cases(snapshot, cases, coverage=True)
    where = locator(args.directory)
    failed = {id(f.case) for f in report.failures}
    rules = len(snapshot.source.rules)
    covered = rules - len(report.uncovered)
    if args.json:
        emit_json({
            "passed": report.total - len(report.failures), "total": report.total,
            "rules": rules, "rules_exercised": covered,
            "cases": [{"where": case.where, "name": case.name, "caller": case.caller,
                       "model": case.model, "action": case.action,
                       "attributes": case.attributes,
                       "expect": "allow" if case.allow else "deny",
                       "expect_rule": case.rule,
                       "got": "allow" if got.allowed else "deny", "rule": where(got.rule),
                       "passed": id(case) not in failed}
                      for case, got in report.results],
            "uncovered": [where(line) for line in report.uncovered]})
        return FAILED if report.failures else OK
    if args.list_cases:
        for case, got in report.results:
            verdict = "FAIL" if id(case) in failed else "PASS"
            label = f" [{case.name}]" if case.name else ""
            print(f"{verdict} {case.where}{label}: {case.describe()}: "
                  f"{'allow' if got.allowed else 'deny'} by {where(got.rule)}")
    for failure in report.failures:
        if not args.list_cases:
            print(f"FAIL {failure}")
    print(f"{report.total - len(report.failures)}/{report.total} cases passed; "
          f"{covered}/{rules} rules exercised")
    if report.uncovered:
        print("rules no case exercised:")
        for line in report.uncovered:
            print(f"  {where(line)}")
    return FAILED if report.failures else OK


# --- explain -----------------------------------------------------------------------------


def _explain(args: argparse.Namespace) -> int:
    from gateway.policy import ACTIONS, PolicyError, did_you_mean, explain

    if args.action not in ACTIONS:
        raise PolicyError(f"unknown action {args.action!r}{did_you_mean(args.action, ACTIONS)}; "
                          f"actions: {', '.join(ACTIONS)}")
    snapshot = compile_here(args.directory)
    attrs: dict[str, object] = {}
    if args.models is not None and args.model:
        attrs.update(_model_attributes(args.models, args.model, args.version))
    elif args.version is not None:
        attrs["model.version"] = args.version
    attrs.update(_attributes(args.attr))
    result = explain(snapshot, args.subject, args.model, args.action, attrs)
    where = locator(args.directory)
    if args.json:
        emit_json({**result.to_dict(snapshot, args.subject, where), "model": args.model,
                   "action": args.action, "attributes": attrs})
    else:
        print(result.render(snapshot, args.subject, where, trace=args.trace))
    return OK if result.decision.allowed else FAILED


def _model_attributes(root: Path, model: str, version: str | None) -> dict[str, object]:
    """The model's attributes as the server computes them from the repository."""
    # The model package (and ONNX Runtime with it) only for the verbs that read a repository.
    from gateway.models import repository_attributes
    from gateway.policy import PolicyError

    versions = [(v, attrs) for name, v, attrs in repository_attributes(root) if name == model]
    if not versions:
        warn(f"note: {shown(root)} has no model {model!r}; a gateway serving that repository "
             "denies every request for it (unknown models are denied like forbidden ones)")
        found: dict[str, object] = {"model.name": model}
        return found | ({"model.version": version} if version else {})
    if version is None:
        version, attrs = max(versions, key=lambda item: _version_key(item[0]))
        warn(f"note: no --version: explaining {model} version {version}, the latest in "
             f"{shown(root)}")
        return attrs
    for v, attrs in versions:
        if v == version:
            return attrs
    raise PolicyError(f"{shown(root)}/{model}: no version {version!r}; versions: "
                      + ", ".join(v for v, _ in versions))


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


# --- diff --------------------------------------------------------------------------------


def _diff(args: argparse.Namespace) -> int:
    from gateway.models import repository_attributes
    from gateway.policy import access_diff, compile_files, conditional_changes, load_revision

    old = compile_files(load_revision(args.old, args.path))
    new = compile_files(load_revision(args.new, args.path))
    instances = repository_attributes(args.models)
    changes = access_diff(old, new, subjects=set(args.subjects),
                          attributes=_attributes(args.attr), instances=instances)
    gone, added = conditional_changes(old, new)
    changed = bool(changes or gone or added)
    if args.json:
        emit_json({"old": {"ref": args.old, "digest": old.digest},
                   "new": {"ref": args.new, "digest": new.digest},
                   "changes": [c.to_dict() for c in changes],
                   "conditional_rules": {"removed": gone, "added": added}})
        return FAILED if args.exit_code and changed else OK
    print(f"--- {args.old} ({old.digest[:16]})\n+++ {args.new} ({new.digest[:16]})")
    for change in changes:
        print(change)
    if gone or added:
        print("conditional rules changed (access depends on request attributes):")
        for text in gone:
            print(f"  - {text}")
        for text in added:
            print(f"  + {text}")
    if not changed:
        print("no change in effective access")
    return FAILED if args.exit_code and changed else OK


# --- fmt ---------------------------------------------------------------------------------


def _fmt(args: argparse.Namespace) -> int:
    from gateway.policy import PolicyError, format_directory, write_atomically

    try:
        formatted = format_directory(args.directory)
    except PolicyError as err:
        raise _relocated(err, args.directory) from None
    dry = args.check or args.diff
    changed = []
    for name, text in formatted.items():
        path = args.directory / name
        before = path.read_text(encoding="utf-8")
        if before == text:
            continue
        changed.append(path)
        if args.diff:
            sys.stdout.writelines(difflib.unified_diff(
                before.splitlines(keepends=True), text.splitlines(keepends=True),
                fromfile=f"{shown(path)} (current)", tofile=f"{shown(path)} (formatted)"))
        elif not dry:
            write_atomically(path, text)
    if not args.diff:
        for path in changed:
            print(f"{'would reformat' if dry else 'reformatted'} {shown(path)}")
    return FAILED if dry and changed else OK


# --- push --------------------------------------------------------------------------------


def _push(args: argparse.Namespace) -> int:
    """Check and test exactly the bytes to publish, through the code a replica's reload
    runs (compile, the cases' own checks, the cases), then publish them in one transaction."""
    from gateway.db import redact, resolve_dsn
    from gateway.policy import (
        POLICY_FILE,
        Bundle,
        PolicyError,
        compile_bundle,
        lint,
        parse_cases,
        run_cases,
    )
    from gateway.policy.postgres import bundle_of, directory_files, publish

    dsn = args.dsn
    if not dsn and args.config:
        from gateway.config import load_section
        from gateway.policy import PolicySettings

        dsn = load_section(args.config, "policy", PolicySettings).dsn
    dsn = resolve_dsn(dsn)
    if not args.directory.is_dir():
        raise PolicyError(f"{shown(args.directory)}: not a directory")
    files = directory_files(args.directory)
    stored = bundle_of(files)
    bundle = Bundle(stored.files, tuple((shown(args.directory / name), data)
                                        for name, data in stored.cases))
    try:
        snapshot = compile_bundle(bundle, run_tests=False)
        cases = parse_cases(list(bundle.cases), snapshot)
    except PolicyError as err:
        raise _relocated(err, args.directory) from None
    if not cases:
        raise PolicyError(f"{shown(args.directory)}: no test cases in tests/; a published "
                          "policy must carry the cases every replica runs before installing it")
    report = run_cases(snapshot, cases)
    where = locator(args.directory)
    findings = lint(snapshot, lambda line: where(f"{POLICY_FILE}:{line}"))
    refused = bool(report.failures) or (args.strict and bool(findings))
    version = 0
    if not refused:
        version, digest = publish(dsn, files, comment=args.comment)
        assert digest == snapshot.digest
    if args.json:
        emit_json({"directory": shown(args.directory), "published": not refused,
                   "version": version or None, "digest": snapshot.digest,
                   "dsn": redact(dsn), "cases": report.total,
                   "failures": [str(f) for f in report.failures],
                   "warnings": [f"{where(POLICY_FILE)}:{f.line}: {f.message}"
                                for f in findings]})
        return FAILED if refused else OK
    for f in findings:
        print(f"{where(POLICY_FILE)}:{f.line}: warning: {f.message} [{f.kind}]")
    for failure in report.failures:
        print(f"FAIL {failure}")
    if refused:
        print(f"{shown(args.directory)}: not published ("
              + (f"{len(report.failures)} of {report.total} cases failed" if report.failures
                 else f"{len(findings)} warning(s) under --strict") + ")")
        return FAILED
    print(f"published policy version {version} (digest {snapshot.digest}) to {redact(dsn)}: "
          f"{len(snapshot.source.rules)} rules, {len(snapshot.source.links)} role links, "
          f"{report.total} cases passed")
    return OK
