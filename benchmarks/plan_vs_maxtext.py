"""MaxText's training step beside ours, both compiled ahead of time for the same TPU topology.

Same model, topology, batch, sequence and remat on both sides, the same libtpu: MaxText (its pip
package, `maxtext.trainers.pre_train.train_compile`, run by its own Python >= 3.12 in a subprocess)
and `python -m dsv3_jax.plan --json` (a subprocess of this Python). Printed side by side, per device
(= per chip on v5e, v5p, v6e; an Ironwood chip shows 2 devices): arguments, temporaries, outputs
written outside the donated arguments, total, fits; compiled FLOPs per token and their ratio to the
model's FLOPs per token (our cost model, `costmodel.train_flops_per_token`, the same for both
sides): the recompute and waste the compiler kept.

Both sides scan their layers by default (one scan for the dense layers, one for the MoE layers), and
the compiler counts a loop's body once: for a scanned step the ratio is taken against a model of one
layer a stack (an ESTIMATE of the whole step's; `--noscan_layers` unrolls both sides and measures it).
What differs by design (docs/SCALE.md, "Side by side with MaxText"): MaxText's routed experts run in
the megablox grouped-matmul kernel and its attention in a Pallas kernel (their FLOPs are the kernels'
own cost estimates); its weights and AdamW moments are float32, so ours run with `--moments float32`
unless told otherwise.

Setup (MaxText needs Python >= 3.12; keep it out of this repo's environment):
    ~/.pyenv/versions/3.12.1/bin/python -m venv /work/maxtext-venv
    /work/maxtext-venv/bin/pip install "maxtext[tpu]==0.2.4" "jax[tpu]==0.10.2"

Usage: MAXTEXT_PYTHON=/work/maxtext-venv/bin/python python benchmarks/plan_vs_maxtext.py
       [--config deepseek_v2_lite_16b] [--layers 4] [--target v5p:2x2x1] [--per_device_batch 1]
       [--seq 4096] [--remat full] [--maxtext_remat full] [--moments float32]
       [--noscan_layers] [--maxtext_arg KEY=VALUE ...] [--sides both|maxtext|ours] [--json]
Exit codes: 0 both compiled (whether or not they fit); 1 a compile failed for another reason than
memory; 2 bad input or MaxText not installed (one line saying how to install it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dsv3_jax.config import ModelConfig
from dsv3_jax.costmodel import train_flops_per_token
from dsv3_jax.plan import GIB, PlanError, chip_of, oom_bytes, refused_bytes

REPO = Path(__file__).resolve().parents[1]
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
INSTALL = ('MaxText is not installed for {python}: make a Python >= 3.12 venv outside the repo and install it, '
           'e.g. ~/.pyenv/versions/3.12.1/bin/python -m venv /work/maxtext-venv && /work/maxtext-venv/bin/pip '
           'install "maxtext[tpu]==0.2.4" "jax[tpu]==0.10.2"; then pass --maxtext_python '
           '/work/maxtext-venv/bin/python (or set MAXTEXT_PYTHON)')
# Our presets and MaxText's model configs (`maxtext/configs/models/*.yml`) of the same models.
MAXTEXT_MODELS = {"deepseek_v2_lite_16b": "deepseek2-16b", "deepseek_v2_236b": "deepseek2-236b",
                  "deepseek_v3_671b": "deepseek3-671b"}
# MaxText names a topology by its TensorCores on v4/v5p/Ironwood (v5p-8 = 4 megacore chips) and by its
# chips on v5e/v6e; the multiplier turns our chip count into its number. The second is JAX devices a chip.
MAXTEXT_TOPOLOGY = {"v5p": (2, 1), "v5e": (1, 1), "v6e": (1, 1), "tpu7x": (2, 2)}
# Asked of MaxText's Python: its version and where its package (and configs/base.yml) lies.
PROBE = ("import importlib.metadata as m, importlib.util as u, json; "
         "s = u.find_spec('maxtext'); "
         "print(json.dumps({'version': m.version('maxtext'), 'package': list(s.submodule_search_locations)[0]}))")


class BenchError(ValueError):
    """Bad input: an unknown target or model, a batch that does not split over the devices."""


# ---- the target and the commands ----------------------------------------------------------------
def maxtext_topology(target: str) -> tuple[str, int]:
    """("v5p:2x2x1") -> ("v5p-8", 4): MaxText's compile_topology name and the JAX devices of the target."""
    chip, _, shape = target.partition(":")
    if chip not in MAXTEXT_TOPOLOGY or not re.fullmatch(r"\d+(x\d+)*", shape):
        raise BenchError(f"--target {target!r}: expected CHIP:TOPOLOGY with CHIP one of "
                         f"{', '.join(MAXTEXT_TOPOLOGY)}, e.g. v5p:2x2x1 (or give --maxtext_topology)")
    chips = math.prod(int(n) for n in shape.split("x"))
    per_name, per_chip = MAXTEXT_TOPOLOGY[chip]
    return f"{chip}-{chips * per_name}", chips * per_chip


def our_config(name_or_path: str, layers: int | None, directory: str) -> str:
    """The --config for the plan: the preset itself, or a JSON copy with `num_layers` replaced."""
    if layers is None:
        return name_or_path
    cfg = ModelConfig.from_json(name_or_path)
    if not cfg.first_k_dense < layers:
        raise BenchError(f"--layers {layers}: must exceed the {cfg.first_k_dense} dense layer(s) of {cfg.name}")
    path = os.path.join(directory, f"{cfg.name}_{layers}layers.json")
    with open(path, "w") as f:
        json.dump(cfg.replace(num_layers=layers).to_dict(), f)
    return path


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def maxtext_command(args: argparse.Namespace, package: str, topology: str, output_dir: str) -> list[str]:
    """MaxText's train_compile with its overrides (KEY=VALUE, as its pyconfig reads them)."""
    overrides = {"model_name": args.maxtext_model, "compile_topology": topology, "compile_topology_num_slices": 1,
                 "per_device_batch_size": _number(args.per_device_batch), "max_target_length": args.seq,
                 "remat_policy": args.maxtext_remat, "dataset_type": "synthetic", "enable_checkpointing": "false",
                 "base_output_directory": output_dir, "run_name": "plan_vs_maxtext"}
    if not args.scan_layers:
        overrides["scan_layers"] = "false"
    if args.layers is not None:  # a model config's own keys are overridden only with override_model_config
        overrides.update(override_model_config="true", base_num_decoder_layers=args.layers)
    for item in args.maxtext_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--maxtext_arg {item!r}: expected KEY=VALUE")
        overrides[key] = value
    return [args.maxtext_python, "-m", "maxtext.trainers.pre_train.train_compile",
            os.path.join(package, "configs", "base.yml"), *(f"{k}={v}" for k, v in overrides.items())]


def our_command(args: argparse.Namespace, config: str, devices: int) -> list[str]:
    batch = args.per_device_batch * devices
    if not float(batch).is_integer():
        raise BenchError(f"--per_device_batch {args.per_device_batch} x {devices} devices is not whole sequences")
    command = [sys.executable, "-m", "dsv3_jax.plan", "--config", config, "--target", args.target,
               "--batch", str(int(batch)), "--seq", str(args.seq), "--remat", args.remat,
               "--moments", args.moments, "--json"]
    return command + (["--mesh", args.mesh] if args.mesh else []) + ([] if args.scan_layers else ["--noscan_layers"])


# ---- reading what each side printed -------------------------------------------------------------
def _with_total(parts: dict) -> dict:
    """Outputs written into the donated arguments (alias) counted once, as dsv3_jax.plan counts them."""
    parts = {k: int(v) for k, v in parts.items()}
    parts["total"] = parts["arguments"] + parts["temporaries"] + parts["outputs"] - parts["alias"]
    return parts


def parse_maxtext(text: str, hbm_bytes: int) -> dict:
    """train_compile's output -> {per_device_bytes, fits, compiled_flops_per_device}; a step the compiler
    refused for want of HBM -> refused, with the temporaries it needed. ValueError if it shows neither."""
    memory = re.search(r"Memory analysis: CompiledMemoryStats\(([^)]*)\)", text)
    if memory is None:
        found = oom_bytes(text)
        if found is None:
            raise ValueError("MaxText printed neither its memory analysis nor an out-of-memory refusal")
        need, have, part = found
        return {"refused_by_compiler": True, "fits": False, "hbm_bytes": have, "compiled_flops_per_device": None,
                "per_device_bytes": refused_bytes(need, part)}
    stats = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", memory.group(1)))
    names = {"arguments": "argument_size_in_bytes", "temporaries": "temp_size_in_bytes",
             "outputs": "output_size_in_bytes", "alias": "alias_size_in_bytes"}
    memory = _with_total({k: stats[v] for k, v in names.items()})
    flops = re.search(r"Cost analysis: .*?'flops': ([-+\d.eE]+)", text)
    return {"refused_by_compiler": False, "fits": memory["total"] <= hbm_bytes, "hbm_bytes": hbm_bytes,
            "per_device_bytes": memory, "compiled_flops_per_device": float(flops.group(1)) if flops else None}


def parse_ours(text: str) -> dict:
    """The plan's --json line (the last line of its stdout that is a JSON object)."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            b = report["per_device_bytes"]
            if b.get("arguments") is not None:
                report["per_device_bytes"] = _with_total({k: b[k] for k in ("arguments", "temporaries",
                                                                           "outputs", "alias")})
            else:
                report["per_device_bytes"] = {**b, "alias": None}
            return report
    raise ValueError("the plan printed no JSON report")


def probe_maxtext(python: str | None) -> dict | None:
    """{version, package} of the MaxText that `python` imports, or None where there is none."""
    if not python:
        return None
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- running ------------------------------------------------------------------------------------
def code_state() -> str | None:
    """Which dsv3_jax the plan ran: `git describe --always --dirty` of this checkout (None outside git)."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _run(command: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\ntimed out after {timeout:.0f} s", time.perf_counter() - start
    return done.returncode, done.stdout + "\n" + done.stderr, time.perf_counter() - start


def _failure(side: str, rc: int, text: str) -> dict:
    tail = [line for line in text.strip().splitlines() if line.strip()][-3:]
    return {"error": f"{side} exited {rc}: " + " | ".join(tail)}


def run_maxtext(args: argparse.Namespace, package: str, topology: str, hbm_bytes: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    with tempfile.TemporaryDirectory(prefix="plan_vs_maxtext_") as out:
        command = maxtext_command(args, package, topology, out)
        rc, text, seconds = _run(command, env, args.timeout)
    try:
        report = parse_maxtext(text, hbm_bytes)
    except ValueError:
        return {**_failure("MaxText", rc, text), "command": command}
    return {**report, "wall_s": seconds, "command": command}


def run_ours(args: argparse.Namespace, config: str, devices: int) -> dict:
    command = our_command(args, config, devices)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    rc, text, seconds = _run(command, env, args.timeout)
    if rc not in (0, 3):  # 3: the plan does not fit, with its report
        return {**_failure("dsv3_jax.plan", rc, text), "command": command}
    return {**parse_ours(text), "wall_s": seconds, "command": command, "code": code_state()}


# ---- output -------------------------------------------------------------------------------------
def counted_once(cfg: ModelConfig) -> ModelConfig:
    """What the compiler's cost analysis sees of a model whose layers are scanned as one stack of dense
    layers and one of MoE layers (MaxText's layout and ours): a loop's body once, one layer a stack."""
    dense = min(cfg.first_k_dense, 1)
    return cfg.replace(num_layers=dense + (cfg.num_layers > cfg.first_k_dense), first_k_dense=dense)


def per_token(report: dict, tokens_per_device: float, setup: dict, scanned: bool) -> dict:
    """Compiled FLOPs per token as the compiler counts them, and their ratio to the model's (recompute and
    waste included); for a scanned step against one layer a stack, and the whole step's FLOPs per token
    that ratio implies (an ESTIMATE)."""
    flops = report.get("compiled_flops_per_device")
    if flops is None:
        return {"scanned": scanned, "compiled_flops_per_token": None, "compiled_over_model": None,
                "estimated_flops_per_token": None}
    per = flops / tokens_per_device
    ratio = per / setup["model_once_flops_per_token" if scanned else "model_flops_per_token"]
    return {"scanned": scanned, "compiled_flops_per_token": per, "compiled_over_model": ratio,
            "estimated_flops_per_token": ratio * setup["model_flops_per_token"] if scanned else per}


def _gib(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / (1 << 20):.2f} MiB"


def _cell(report: dict | None, row: str) -> str:
    if report is None:
        return "(not run)"
    if "error" in report:
        return "(failed)"
    b = report["per_device_bytes"]
    refused = report.get("refused_by_compiler")
    if row == "outputs":  # the outputs not written into donated arguments
        return "-" if b["outputs"] is None else _gib(b["outputs"] - b["alias"])
    if row == "temporaries" and refused:
        return f"{_gib(b['temporaries'])} (refused)"
    if row in b:
        return _gib(b[row])
    if row == "fits":
        if not report["fits"] and b["total"] is not None:  # say by how much: it may be within a rounding
            return f"NO ({_gib(b['total'] - report['hbm_bytes'])} over {_gib(report['hbm_bytes'])})"
        return f"{'yes' if report['fits'] else 'NO'} (of {_gib(report['hbm_bytes'])})"
    if row in ("flops", "estimate"):
        f = report.get("compiled_flops_per_token" if row == "flops" else "estimated_flops_per_token")
        return "-" if f is None else f"{f:.4g}" + (" *" if row == "estimate" and report.get("scanned") else "")
    if row == "ratio":
        r = report.get("compiled_over_model")
        return "-" if r is None else f"{r:.2f}x" + (" *" if report.get("scanned") else "")
    if row == "compile":
        compile_s = report.get("compile_s")
        return f"{report['wall_s']:.0f} s" + (f" ({compile_s:.0f} s compile)" if compile_s else "")
    raise KeyError(row)


ROWS = [("arguments", "arguments"), ("temporaries", "temporaries"), ("outputs", "outputs, not donated"),
        ("total", "total"), ("fits", "fits"), ("flops", "compiled FLOPs / token"),
        ("ratio", "compiled / model FLOPs"), ("estimate", "step FLOPs / token"), ("compile", "wall (process)")]


def format_side_by_side(result: dict) -> str:
    s = result["setup"]
    head = (f"{s['model']} ({s['layers']} layers) on {s['target']} ({s['devices']} devices; MaxText "
            f"{s['maxtext_topology']}), {s['per_device_batch']:g} x {s['seq']} tokens per device, remat "
            f"{s['remat']} (MaxText {s['maxtext_remat']}), model FLOPs / token {s['model_flops_per_token']:.4g}")
    mt, ours = result.get("maxtext"), result.get("ours")
    left = f"MaxText {s.get('maxtext_version') or ''}".strip()
    lines = [head, f"{'per device':<24}{left:>26}{'dsv3_jax':>26}"]
    lines += [f"{label:<24}{_cell(mt, key):>26}{_cell(ours, key):>26}" for key, label in ROWS]
    for name, report in (("MaxText", mt), ("dsv3_jax", ours)):
        if report and "error" in report:
            lines.append(f"{name} failed: {report['error']}")
    if any(r and r.get("scanned") and r.get("compiled_flops_per_token") for r in (mt, ours)):
        lines.append(f"* scanned layers: the compiler counts a loop's body once, so these FLOPs are against a model "
                     f"of one layer a stack ({s['model_once_flops_per_token']:.4g} a token), an ESTIMATE of the "
                     "whole step's ratio (--noscan_layers measures it)")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="deepseek_v2_lite_16b", help="our preset name or ModelConfig JSON path")
    p.add_argument("--maxtext_model", default=None, help="MaxText's model_name (default: the preset's peer, "
                   f"{MAXTEXT_MODELS})")
    p.add_argument("--layers", type=int, default=None, help="override the layer count on both sides")
    p.add_argument("--target", default="v5p:2x2x1", help="TPU topology as libtpu spells it")
    p.add_argument("--maxtext_topology", default=None, help="MaxText's compile_topology (default: from --target)")
    p.add_argument("--mesh", default="", help="our mesh (default: every device on fsdp, as MaxText's default)")
    p.add_argument("--per_device_batch", type=float, default=1.0, help="sequences per device (MaxText's "
                   "per_device_batch_size); our --batch is this times the devices")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--remat", default="full", help="our remat policy (dsv3_jax.plan --remat)")
    p.add_argument("--maxtext_remat", default="full", help="MaxText's remat_policy")
    p.add_argument("--moments", default="float32", help="our AdamW moments (MaxText's are float32 like its weights)")
    p.add_argument("--noscan_layers", dest="scan_layers", action="store_false",
                   help="unroll the layers on both sides (MaxText scan_layers=false, ours --noscan_layers)")
    p.add_argument("--maxtext_arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another MaxText config override, e.g. scan_layers=false (repeatable)")
    p.add_argument("--maxtext_python", default=os.environ.get("MAXTEXT_PYTHON"),
                   help="the Python with MaxText installed (default: $MAXTEXT_PYTHON)")
    p.add_argument("--sides", default="both", choices=("both", "maxtext", "ours"), help="which compiles to run")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds each compile may take")
    p.add_argument("--json", action="store_true", help="print the result as one line of JSON")
    return p


def _setup(args: argparse.Namespace, info: dict | None) -> dict:
    cfg = ModelConfig.from_json(args.config)
    if args.layers is not None:
        cfg = cfg.replace(num_layers=args.layers)
    topology, devices = maxtext_topology(args.target)
    return {"model": f"{os.path.splitext(os.path.basename(args.config))[0]}", "maxtext_model": args.maxtext_model,
            "layers": cfg.num_layers, "target": args.target, "devices": devices,
            "maxtext_topology": args.maxtext_topology or topology, "per_device_batch": args.per_device_batch,
            "seq": args.seq, "remat": args.remat, "maxtext_remat": args.maxtext_remat, "moments": args.moments,
            "scan_layers": args.scan_layers, "maxtext_args": list(args.maxtext_arg),
            "maxtext_version": info and info["version"], "model_flops_per_token": train_flops_per_token(cfg, args.seq),
            "model_once_flops_per_token": train_flops_per_token(counted_once(cfg), args.seq)}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.maxtext_model = args.maxtext_model or MAXTEXT_MODELS.get(os.path.splitext(os.path.basename(args.config))[0])
    info = None
    if args.sides != "ours":
        info = probe_maxtext(args.maxtext_python)
        if info is None:
            print(INSTALL.format(python=args.maxtext_python or "this run (no --maxtext_python, no $MAXTEXT_PYTHON)"))
            return EXIT_BAD_INPUT
        if args.maxtext_model is None:
            print(f"--maxtext_model: no MaxText peer known for --config {args.config!r}; name one")
            return EXIT_BAD_INPUT
    try:
        setup = _setup(args, info)
        hbm = chip_of(args.target).usable_hbm_bytes
    except (BenchError, PlanError, OSError, ValueError) as e:
        print(f"plan_vs_maxtext: error: {e}")
        return EXIT_BAD_INPUT
    result = {"setup": setup, "maxtext": None, "ours": None}
    tokens = args.per_device_batch * args.seq
    with tempfile.TemporaryDirectory(prefix="plan_vs_maxtext_cfg_") as directory:
        try:
            config = our_config(args.config, args.layers, directory)
            if args.sides != "ours":
                result["maxtext"] = run_maxtext(args, info["package"], setup["maxtext_topology"], hbm)
            if args.sides != "maxtext":
                result["ours"] = run_ours(args, config, setup["devices"])
        except BenchError as e:
            print(f"plan_vs_maxtext: error: {e}")
            return EXIT_BAD_INPUT
    maxtext_scanned = args.scan_layers and "scan_layers=false" not in [a.lower() for a in args.maxtext_arg]
    for side, scanned in (("maxtext", maxtext_scanned), ("ours", None)):
        report = result[side]
        if report and "error" not in report:
            scanned = report.get("scan_layers", False) if scanned is None else scanned  # as the plan says
            report.update(per_token(report, tokens, setup, scanned))
    print(json.dumps(result) if args.json else format_side_by_side(result))
    failed = any(r and "error" in r for r in (result["maxtext"], result["ours"]))
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
