"""`gateway model profile MODEL_DIR --data REF.npy`: the reference profile anomaly scores use.

Writes ``MODEL_DIR/profile.json`` (canonical JSON, so signing the model directory afterwards
covers it): per-feature statistics and hard bounds, a shrunk inverse covariance, input-score
thresholds calibrated on a held-out split at the requested false-positive rates, the PRADA
threshold, and, by running the model on the reference data, the output distribution and its
drift thresholds. Prints each target false-positive rate beside the rate its threshold
achieved out of sample, so a miscalibrated profile shows before it is signed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import GatewayError

if TYPE_CHECKING:
    # numpy and the monitor package are imported by the functions that profile, not by
    # register(): building the `gateway` parser must not load them.
    import numpy as np

    from gateway.monitor import InputProfile

_CHUNK = 1024


def register(verbs: argparse._SubParsersAction) -> None:
    """Add `profile` to the `model` group."""
    p = verbs.add_parser(
        "profile", help="build the input/output reference profile (profile.json) of a model",
        description="Fit the anomaly-detection profile of MODEL_DIR (a model version directory "
                    "holding model.onnx) from reference data, and write MODEL_DIR/profile.json. "
                    "Sign the model directory afterwards so the signature covers the profile.")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    p.add_argument("--data", type=Path, required=True, metavar="REF.npy",
                   help="reference inputs: a .npy array, one row per example")
    p.add_argument("--fpr", default="0.01,0.001",
                   help="false-positive rates to calibrate thresholds at (comma-separated)")
    p.add_argument("--holdout", type=float, default=0.5,
                   help="fraction of rows held out for calibration (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and simulations")
    p.add_argument("--drift-window", type=int, default=256,
                   help="predictions per output-drift window (default 256)")
    p.add_argument("--no-outputs", action="store_true",
                   help="do not run the model: no output-drift reference")
    p.set_defaults(func=_profile)


def _parse_fprs(text: str) -> tuple[float, ...]:
    from gateway.monitor import ProfileError

    try:
        fprs = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise ProfileError(f"--fpr {text!r}: expected comma-separated numbers") from err
    if not fprs or not all(0 < f < 0.5 for f in fprs):
        raise ProfileError(f"--fpr {text!r}: each rate must be in (0, 0.5)")
    return fprs


def _load_data(path: Path) -> np.ndarray:
    import numpy as np

    from gateway.monitor import ProfileError

    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise ProfileError(f"{path}: no such file") from err
    except (OSError, ValueError) as err:
        raise ProfileError(f"{path}: not a numeric .npy array ({err})") from err
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf" or data.ndim < 1:
        raise ProfileError(f"{path}: expected a numeric array with one row per example")
    return data


def _run_model(model: Path, data: np.ndarray) -> np.ndarray:
    """The model's first output on ``data`` (in chunks; one thread, as the gateway runs it)."""
    import numpy as np
    import onnxruntime as ort

    from gateway.models import runtime_from_dir
    from gateway.monitor import ProfileError

    ort_types = {"tensor(float)": np.float32, "tensor(double)": np.float64,
                 "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32}

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    runtime = runtime_from_dir(model.parent)  # as the gateway loads it: no path opened by ORT
    try:
        session = runtime.session(options)
    except Exception as err:  # onnxruntime raises its own untyped errors
        raise ProfileError(f"{model}: ONNX Runtime cannot load it ({err}); "
                           "use --no-outputs to profile inputs only") from err
    (inp, *_) = session.get_inputs()
    dtype = ort_types.get(inp.type)
    if dtype is None:
        raise ProfileError(f"{model}: input {inp.name!r} has type {inp.type}; "
                           "profiles cover numeric tensors only")
    want = [d if isinstance(d, int) else None for d in inp.shape]
    got = list(data.shape)
    if len(want) != len(got) or any(w is not None and w != g for w, g in
                                   zip(want[1:], got[1:], strict=False)):
        raise ProfileError(f"reference data has shape {tuple(got)}, model input {inp.name!r} "
                           f"expects {tuple('?' if w is None else w for w in want)}")
    chunk = want[0] if want[0] is not None else _CHUNK
    if want[0] is not None and len(data) % chunk:
        raise ProfileError(f"model input batch is fixed at {chunk}; reference rows "
                           f"({len(data)}) must be a multiple of it")
    outs = []
    output_name = session.get_outputs()[0].name
    for start in range(0, len(data), chunk):
        batch = data[start:start + chunk].astype(dtype)
        try:
            (y,) = session.run([output_name], {inp.name: batch})
        except Exception as err:
            raise ProfileError(f"{model}: inference on the reference data failed: {err}") from err
        outs.append(np.asarray(y))
    return np.concatenate(outs)


def write_profile(model_dir: Path, data: np.ndarray, *, fprs: tuple[float, ...] = (0.01, 0.001),
                  seed: int = 0, holdout: float = 0.5, drift_window: int = 256,
                  outputs: bool = True) -> InputProfile:
    """Fit ``model_dir``'s profile on ``data`` (running the model for the output reference
    unless ``outputs`` is false) and write ``model_dir/profile.json``. Sign afterwards."""
    from gateway.monitor import PROFILE_FILE, InputProfile, ProfileError

    model = model_dir / "model.onnx"
    if not model_dir.is_dir():
        raise GatewayError(f"{model_dir}: not a directory")
    predictions = None
    if outputs:
        if not model.is_file():
            raise ProfileError(f"{model}: no model file (use --no-outputs to profile "
                               "inputs only)")
        predictions = _run_model(model, data)
    profile = InputProfile.fit(data, fprs=fprs, seed=seed, holdout=holdout,
                               outputs=predictions, drift_window=drift_window)
    profile.save(model_dir / PROFILE_FILE)
    return profile


def _profile(args: argparse.Namespace) -> int:
    from gateway.monitor import PROFILE_FILE

    model_dir: Path = args.model_dir
    profile = write_profile(model_dir, _load_data(args.data), fprs=_parse_fprs(args.fpr),
                            seed=args.seed, holdout=args.holdout,
                            drift_window=args.drift_window, outputs=not args.no_outputs)
    meta = profile.meta
    print(f"wrote {model_dir / PROFILE_FILE}")
    print(f"  features {profile.features}; rows fitted {meta['n_fit']}, held out "
          f"{meta['n_holdout']}; covariance shrinkage {meta['shrinkage']:.4f}")
    print("  target FPR  held-out FPR  input score >   PRADA W <" +
          ("   output PSI >" if profile.output is not None else ""))
    for fpr, threshold in profile.thresholds:
        achieved = profile.heldout_fpr(fpr)
        line = (f"  {fpr:<10g}  {'-' if achieved is None else f'{achieved:.4f}':<12}  "
                f"{threshold:<14.4f}  {profile.prada_threshold(fpr):<10.4f}")
        if profile.output is not None:
            line += f"  {profile.output.threshold(fpr):.4f}"
        print(line)
    print("  (held-out FPR: calibrated on one half of the held-out rows, measured on the other)")
    if profile.output is not None:
        print(f"  outputs: {profile.output.kind} summary, {profile.output.classes} bins, "
              f"window {profile.output.window}")
    for warning in profile.warnings:
        print(f"  warning: {warning}")
    print(f"note: sign (or re-sign) {model_dir} now, so the signature covers {PROFILE_FILE}")
    return 0


def profile_demo_models(repository: Path, key: Path, *, force: bool = False) -> list[Path]:
    """Profile the demo models that have no valid profile yet (all with ``force``), re-sign
    them.

    demo-mlp is fitted on seeded N(0, 1) reference data (:func:`demo_reference`), so the demo
    gateway scores its inputs; demo-types (several inputs) is not profiled.
    """
    from gateway.models.demo import demo_reference
    from gateway.models.signing import sign_model
    from gateway.monitor import PROFILE_FILE, InputProfile, ProfileError

    done = []
    for directory in sorted(repository.glob("demo-mlp/*")):
        if (directory / PROFILE_FILE).exists() and not force:
            try:
                InputProfile.load(directory / PROFILE_FILE)
                continue
            except ProfileError:  # an older format: fit it again
                pass
        write_profile(directory, demo_reference())
        sign_model(directory, key=key)
        done.append(directory)
    return done
