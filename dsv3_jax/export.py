"""Export a training run's weights for inference: orbax (always) and Hugging Face (with --hf).

    python -m dsv3_jax.export --workdir workdir --out export [--step N] [--hf] [--hf_weights fp8]

A training checkpoint (WORKDIR/checkpoints/<step>/, written by `dsv3_jax.train.loop`) holds the
whole train state: params, AdamW moments, router biases, step. Inference needs only the params and
the biases, a third of it. The export directory holds:

    OUT/model_config.json  the full ModelConfig (`ModelConfig.from_json` reads it)
    OUT/orbax/             {"params", "router"} as an orbax PyTree checkpoint (`load_exported`)
    OUT/hf/                with --hf: config.json + safetensors in DeepSeek's layout (`load_hf_checkpoint`,
                           transformers' `DeepseekV3ForCausalLM.from_pretrained`)
    OUT/export.json        where it came from: the workdir, the step and the run's tokenizer spec

The training checkpoints are only read. The export is written to a temporary directory beside OUT
and renamed into place at the end, so a failure leaves nothing half-written, and an existing,
non-empty OUT is replaced only with `overwrite`. Arrays come back as host numpy arrays, whatever
devices the run trained on: put them on devices (or shard them) as the inference job needs.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import save_hf_checkpoint
from dsv3_jax.model import variable_shapes

HF_WEIGHTS = ("float32", "bfloat16", "fp8")
CONFIG_FILE, INFO_FILE, ORBAX_DIR, HF_DIR = "model_config.json", "export.json", "orbax", "hf"
COLLECTIONS = ("params", "router")  # what inference needs of the train state


class ExportError(RuntimeError):
    """A problem with the user's input, reported as one message and a non-zero exit."""


# ---- reading a training workdir -------------------------------------------------------------------

def _checkpoints_dir(workdir: str) -> str:
    checkpoints = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(workdir):
        raise ExportError(f"workdir {workdir}: no such directory")
    if not os.path.isdir(checkpoints):
        raise ExportError(f"{workdir}: no checkpoints/ directory (not a training workdir, or no checkpoint yet)")
    return checkpoints


def _manager(checkpoints: str) -> ocp.CheckpointManager:
    # read_only: the manager neither creates nor cleans up anything in the training run's directory.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers=handlers)


def _pick_step(mgr: ocp.CheckpointManager, checkpoints: str, step: int | None) -> int:
    steps = sorted(mgr.all_steps())
    if not steps:
        raise ExportError(f"{checkpoints}: no checkpoint (has the run saved one yet?)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ExportError(f"{checkpoints}: no checkpoint of step {step}; available steps: {steps}")
    return step


def _as_numpy(metadata_tree) -> dict:
    """Restore arguments that bring every leaf back as a host numpy array (any saved sharding)."""
    return jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata_tree)


def _check_shapes(cfg: ModelConfig, variables: dict, where: str) -> None:
    want = {k: v for k, v in variable_shapes(cfg).items() if v}
    want_leaves = {jax.tree_util.keystr(p): (x.shape, np.dtype(x.dtype))
                   for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    got_leaves = {jax.tree_util.keystr(p): (np.shape(x), np.asarray(x).dtype)
                  for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    for name in sorted(set(want_leaves) | set(got_leaves)):
        if want_leaves.get(name) != got_leaves.get(name):
            raise ExportError(f"{where}: variable {name} is {got_leaves.get(name, 'missing')}, the model config "
                              f"expects {want_leaves.get(name, 'no such variable')}")


def restore_variables(workdir: str, step: int | None = None) -> tuple[ModelConfig, dict, int, str]:
    """(ModelConfig, {"params", "router"}, step, tokenizer spec) of a training checkpoint; the latest
    without `step`.

    Only the params and router biases are read (partial restore from the saved tree's own metadata),
    so the optimizer's structure is never needed and its moments never loaded.
    """
    checkpoints = _checkpoints_dir(workdir)
    mgr = _manager(checkpoints)
    try:
        step = _pick_step(mgr, checkpoints, step)
        meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        try:
            # Runs before the Runtime split wrote the model fields under "model" and the full config,
            # runtime fields included, under "config"; from_dict reads either (legacy keys dropped).
            cfg = ModelConfig.from_dict(meta.get("config", meta["model"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{checkpoints}/{step}: its meta does not describe a model this code knows: {e}") from e
        tokenizer = meta.get("tokenizer", "byte")  # runs before the spec was recorded used bytes
        saved = mgr.item_metadata(step)["state"].tree
        wanted = {k: saved[k] for k in COLLECTIONS if saved.get(k)}
        state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=wanted, restore_args=_as_numpy(wanted), partial_restore=True)))["state"]
    finally:
        mgr.close()
    variables = {k: state[k] for k in COLLECTIONS if state.get(k)}
    _check_shapes(cfg, variables, f"{checkpoints}/{step}")
    return cfg, variables, step, tokenizer


# ---- writing and reading an export ----------------------------------------------------------------

def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _refuse_unsafe_destination(workdir: str, out: str, overwrite: bool) -> None:
    out_real, wd_real = os.path.realpath(out), os.path.realpath(workdir)
    # Replacing OUT deletes it: it must be neither the workdir, one of its parents, nor inside its checkpoints.
    if _within(wd_real, out_real) or _within(out_real, os.path.join(wd_real, "checkpoints")):
        raise ExportError(f"--out {out} would overlap the training run's checkpoints in {workdir}; "
                          "choose another directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")


def _write(tmp: str, cfg: ModelConfig, variables: dict, info: dict, hf_weights: str | None) -> None:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(tmp, ORBAX_DIR), args=ocp.args.PyTreeSave(variables))
    if hf_weights is not None:
        save_hf_checkpoint(cfg, variables, os.path.join(tmp, HF_DIR), weights=hf_weights)
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)


def _move_into_place(tmp: str, out: str) -> None:
    """Rename `tmp` to `out`; an existing `out` is set aside first and deleted only once `tmp` is in."""
    old = None
    if os.path.lexists(out):
        old = tempfile.mkdtemp(prefix=".export-old-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(workdir: str, out: str, *, step: int | None = None, hf: bool = False, hf_weights: str = "float32",
           overwrite: bool = False) -> dict:
    """Write a training checkpoint's inference variables to `out` (layout in the module docstring).

    Returns what was written: {"out", "workdir", "step", "config", "orbax", "hf"} (paths; "hf" is
    None without `hf`).
    """
    if hf_weights not in HF_WEIGHTS:
        raise ExportError(f"--hf_weights={hf_weights!r}: expected one of {list(HF_WEIGHTS)}")
    out = os.path.abspath(out)
    _checkpoints_dir(workdir)
    _refuse_unsafe_destination(workdir, out, overwrite)
    cfg, variables, step, tokenizer = restore_variables(workdir, step)
    info = {"workdir": os.path.abspath(workdir), "step": step, "tokenizer": tokenizer}
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become OUT's mode
        _write(tmp, cfg, variables, info, hf_weights if hf else None)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": out, **info, "config": os.path.join(out, CONFIG_FILE), "orbax": os.path.join(out, ORBAX_DIR),
            "hf": os.path.join(out, HF_DIR) if hf else None}


def load_exported(out: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, {"params", "router"}) from a directory written by `export`."""
    config, ckpt = os.path.join(out, CONFIG_FILE), os.path.abspath(os.path.join(out, ORBAX_DIR))
    if not (os.path.isfile(config) and os.path.isdir(ckpt)):
        raise ExportError(f"{out}: not an export directory (expected {CONFIG_FILE} and {ORBAX_DIR}/)")
    cfg = ModelConfig.from_json(config)
    with ocp.PyTreeCheckpointer() as ckptr:
        saved = ckptr.metadata(ckpt).item_metadata.tree
        variables = ckptr.restore(ckpt, args=ocp.args.PyTreeRestore(item=saved, restore_args=_as_numpy(saved)))
    _check_shapes(cfg, variables, ckpt)
    return cfg, dict(variables)


# ---- command line -------------------------------------------------------------------------------

def _flags() -> flags.FlagValues:
    # A private FlagValues: importing this module defines no global flags that could clash with a
    # program's own (train.py has --workdir too).
    fv = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "training workdir (the one holding checkpoints/)", flag_values=fv)
    flags.DEFINE_string("out", None, "export directory to create", flag_values=fv)
    flags.DEFINE_integer("step", None, "checkpoint step to export (default: the latest)", flag_values=fv)
    flags.DEFINE_bool("hf", False, "also write a Hugging Face checkpoint to OUT/hf", flag_values=fv)
    flags.DEFINE_enum("hf_weights", "float32", list(HF_WEIGHTS), "weight format of the Hugging Face checkpoint",
                      flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace OUT if it exists and is not empty", flag_values=fv)
    flags.DEFINE_bool("help", False, "show this help", flag_values=fv)
    return fv


def _run(argv: list[str]) -> dict | None:
    fv = _flags()
    try:
        rest = fv(argv)
    except flags.Error as e:
        raise ExportError(str(e)) from e
    if fv.help:
        print(__doc__.strip().splitlines()[0] + "\n" + fv.get_help())
        return None
    if len(rest) > 1:
        raise ExportError(f"unexpected arguments {rest[1:]}")
    for name in ("workdir", "out"):
        if not fv[name].value:
            raise ExportError(f"--{name} is required")
    return export(fv.workdir, fv.out, step=fv.step, hf=fv.hf, hf_weights=fv.hf_weights, overwrite=fv.overwrite)


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3_jax.export`; `argv` without the program name. 0 on success; on bad input,
    one line on stderr and 1."""
    argv = list(sys.argv if argv is None else ["dsv3_jax.export", *argv])
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns at length about read-only directories
    try:
        written = _run(argv)
    except (ExportError, OSError) as e:  # OSError: e.g. no permission to write OUT
        print(f"export: {e}", file=sys.stderr)
        return 1
    finally:
        logging.set_verbosity(verbosity)
    if written is not None:
        print(f"exported step {written['step']} of {written['workdir']} to {written['out']}: {CONFIG_FILE}, "
              f"{ORBAX_DIR}/" + (f", {HF_DIR}/" if written["hf"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
