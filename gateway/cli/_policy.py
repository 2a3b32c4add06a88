"""`gateway policy check|test|explain|diff|fmt`: the policy toolchain for security teams.

    gateway policy check policies
    gateway policy test policies policies/tests/*.yaml
    gateway policy explain policies --as spiffe://demo.local/svc/scorer --model demo-mlp \\
        --action infer --attr model.labels.stage=retired
    gateway policy diff HEAD~1 policies          # directories or git revisions
    gateway policy fmt policies [--check]

Each handler returns the exit code: 0 success, 1 a finding (failed case, unformatted file,
changed access with --exit-code); bad input raises PolicyError, which the dispatcher prints
as ``file:line: problem`` lines and exits 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gateway.policy import (
    ATTRIBUTE_PREFIXES,
    PolicyError,
    case_files,
    compile_directory,
    load_cases,
    run_cases,
)
from gateway.policy._tools import (
    access_diff,
    compile_files,
    conditional_changes,
    explain,
    format_directory,
    load_revision,
    repository_models,
    write_atomically,
)

_INT = re.compile(r"-?[0-9]+\Z")
_FLOAT = re.compile(r"-?[0-9]+\.[0-9]+\Z")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `policy` verb group."""
    parser = subparsers.add_parser("policy", help="check, test, explain, diff and format policy")
    verbs = parser.add_subparsers(dest="policy_command", metavar="VERB", required=True)

    p = verbs.add_parser("check", help="validate model.conf and policy.csv (every error, "
                         "with file and line)")
    p.add_argument("directory", type=Path)
    p.set_defaults(func=_check)

    p = verbs.add_parser("test", help="run YAML test cases; report failures and rules no "
                         "case exercised")
    p.add_argument("directory", type=Path)
    p.add_argument("cases", type=Path, nargs="*",
                   help="case files (default: DIRECTORY/tests/*.yaml)")
    p.set_defaults(func=_test)

    p = verbs.add_parser("explain", help="why a request is allowed or denied")
    p.add_argument("directory", type=Path)
    p.add_argument("--as", dest="subject", required=True, metavar="ID",
                   help="caller SPIFFE ID, cn: name or role")
    p.add_argument("--model", default="", help="model name ('' for gateway-level actions)")
    p.add_argument("--version", default=None, help="model version (sets model.version)")
    p.add_argument("--action", required=True)
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="request/model/caller attribute, repeatable")
    p.set_defaults(func=_explain)

    p = verbs.add_parser("diff", help="the access that changes between two policies")
    p.add_argument("old", help="directory or git revision")
    p.add_argument("new", help="directory or git revision")
    p.add_argument("--path", default="policies",
                   help="policy directory inside the git tree, for revisions (default policies)")
    p.add_argument("--models", type=Path, default=Path("models"),
                   help="model repository whose models (and their metadata labels) join "
                   "the comparison")
    p.add_argument("--as", dest="subjects", action="append", default=[], metavar="ID",
                   help="extra identity to compare, repeatable")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                   help="attributes every compared request carries, repeatable")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when access changes")
    p.set_defaults(func=_diff)

    p = verbs.add_parser("fmt", help="rewrite model.conf and policy.csv canonically")
    p.add_argument("directory", type=Path)
    p.add_argument("--check", action="store_true",
                   help="change nothing; exit 1 if a file is not canonical")
    p.set_defaults(func=_fmt)


def _attributes(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key.startswith(ATTRIBUTE_PREFIXES):
            raise PolicyError(f"--attr {pair!r}: expected KEY=VALUE with KEY under "
                              + ", ".join(ATTRIBUTE_PREFIXES))
        value: object = raw
        if _INT.match(raw):
            value = int(raw)
        elif _FLOAT.match(raw):
            value = float(raw)
        elif raw in ("true", "false"):
            value = raw == "true"
        out[key] = value
    return out


def _check(args: argparse.Namespace) -> int:
    snapshot = compile_directory(args.directory, run_tests=False)
    files = case_files(args.directory)
    cases = load_cases(files)
    source = snapshot.source
    print(f"{args.directory}: ok: {len(source.rules)} rules, {len(source.links)} role links, "
          f"{len(cases)} test cases in {len(files)} file(s); digest {snapshot.digest}")
    return 0


def _test(args: argparse.Namespace) -> int:
    snapshot = compile_directory(args.directory, run_tests=False)
    files = args.cases or case_files(args.directory)
    if not files:
        raise PolicyError(f"{args.directory}: no test cases given and none in tests/")
    cases = load_cases(files)
    report = run_cases(snapshot, cases, coverage=True)
    for failure in report.failures:
        print(f"FAIL {failure}")
    passed = report.total - len(report.failures)
    rules = len(snapshot.source.rules)
    covered = rules - len(report.uncovered)
    print(f"{passed}/{report.total} cases passed; {covered}/{rules} rules exercised")
    if report.uncovered:
        print("rules no case exercised:")
        for line in report.uncovered:
            print(f"  {line}")
    return 1 if report.failures else 0


def _explain(args: argparse.Namespace) -> int:
    snapshot = compile_directory(args.directory, run_tests=False)
    attrs = _attributes(args.attr)
    if args.version is not None:
        attrs["model.version"] = args.version
    result = explain(snapshot, args.subject, args.model, args.action, attrs)
    print(result.render(snapshot, args.subject))
    return 0


def _diff(args: argparse.Namespace) -> int:
    old = compile_files(load_revision(args.old, args.path))
    new = compile_files(load_revision(args.new, args.path))
    instances = repository_models(args.models)
    changes = access_diff(old, new, subjects=set(args.subjects),
                          attributes=_attributes(args.attr), instances=instances)
    print(f"--- {args.old} ({old.digest[:16]})\n+++ {args.new} ({new.digest[:16]})")
    for change in changes:
        print(change)
    gone, added = conditional_changes(old, new)
    if gone or added:
        print("conditional rules changed (access depends on request attributes):")
        for text in gone:
            print(f"  - {text}")
        for text in added:
            print(f"  + {text}")
    if not changes and not gone and not added:
        print("no change in effective access")
    return 1 if args.exit_code and (changes or gone or added) else 0


def _fmt(args: argparse.Namespace) -> int:
    formatted = format_directory(args.directory)
    changed = []
    for name, text in formatted.items():
        path = args.directory / name
        if path.read_text(encoding="utf-8") != text:
            changed.append(path)
            if not args.check:
                write_atomically(path, text)
    for path in changed:
        print(f"{'would reformat' if args.check else 'reformatted'} {path}")
    return 1 if args.check and changed else 0
