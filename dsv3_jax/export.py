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

Without --step, the newest checkpoint that restores is exported, and a warning line names each newer
one that does not (damaged: train.py moves such a checkpoint aside when it resumes); a --step that
does not restore is refused in one line naming the other steps. The training checkpoints are only
read. The export is written to a temporary directory beside OUT and renamed into place at the end,
so a failure leaves nothing half-written, and an existing, non-empty OUT is replaced only with
`overwrite`, and only if it is an earlier export. Arrays come back as host numpy arrays, whatever
devices the run trained on: put them on devices (or shard them) as the inference job needs.
"""
from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags

from dsv3_jax.config import ModelConfig
from dsv3_jax.hf import save_hf_checkpoint
from dsv3_jax.model import unstack_layers, variable_shapes
from dsv3_jax.train.workdir import WorkdirError, quiet_abandoned_reads, reason, restore_newest, warn

HF_WEIGHTS = ("float32", "bfloat16", "fp8")
CONFIG_FILE, INFO_FILE, ORBAX_DIR, HF_DIR = "model_config.json", "export.json", "orbax", "hf"
EXPORT_ENTRIES = (CONFIG_FILE, INFO_FILE, ORBAX_DIR, HF_DIR)  # all an export directory holds
COLLECTIONS = ("params", "router")  # what inference needs of the train state
# What orbax logs at WARNING on opening a checkpoint directory read-only, as it is asked to here.
READ_ONLY_NOTICES = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


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


class _DropReadOnlyNotices(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith(READ_ONLY_NOTICES)


@contextlib.contextmanager
def _quiet_read_only():
    """Drop orbax's notices that a read-only manager is read-only (absl logs through the "absl" logger);
    every other warning still shows."""
    logger, drop = std_logging.getLogger("absl"), _DropReadOnlyNotices()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _manager(checkpoints: str) -> ocp.CheckpointManager:
    # read_only: the manager neither creates nor cleans up anything in the training run's directory.
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    with _quiet_read_only():
        return ocp.CheckpointManager(checkpoints, options=options, item_handlers=handlers)


def _steps(mgr: ocp.CheckpointManager, checkpoints: str, step: int | None) -> list[int]:
    steps = sorted(mgr.all_steps())
    if not steps:
        raise ExportError(f"{checkpoints}: no checkpoint (has the run saved one yet?)")
    if step is not None and step not in steps:
        raise ExportError(f"{checkpoints}: no checkpoint of step {step}; available steps: {steps}")
    return steps


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


def _restore_step(mgr: ocp.CheckpointManager, checkpoints: str, step: int) -> tuple[ModelConfig, dict, str]:
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
    # A scanned run's checkpoint holds its layers stacked: exports are per layer, the interchange layout.
    variables = unstack_layers({k: state[k] for k in COLLECTIONS if state.get(k)}, cfg)
    _check_shapes(cfg, variables, f"{checkpoints}/{step}")
    return cfg, variables, tokenizer


def _restore_named(mgr: ocp.CheckpointManager, checkpoints: str, step: int, steps: list[int]):
    quiet_abandoned_reads()
    try:
        return _restore_step(mgr, checkpoints, step)
    except ExportError:
        raise
    except Exception as e:  # orbax and tensorstore raise ValueError, OSError, RuntimeError, ...
        others = [s for s in steps if s != step]
        raise ExportError(f"{checkpoints}/{step} does not restore ({reason(e)}); other checkpoints: {others}") from e


def restore_variables(workdir: str, step: int | None = None) -> tuple[ModelConfig, dict, int, str]:
    """(ModelConfig, {"params", "router"}, step, tokenizer spec) of a training checkpoint; without
    `step`, the newest that restores, with a warning line naming each newer one that does not
    (damaged: train.py sets those aside when it resumes).

    Only the params and router biases are read (partial restore from the saved tree's own metadata),
    so the optimizer's structure is never needed and its moments never loaded.
    """
    checkpoints = _checkpoints_dir(workdir)
    mgr = _manager(checkpoints)
    try:
        steps = _steps(mgr, checkpoints, step)
        if step is not None:
            cfg, variables, tokenizer = _restore_named(mgr, checkpoints, step, steps)
            return cfg, variables, step, tokenizer
        try:
            step, (cfg, variables, tokenizer), skipped = restore_newest(
                steps, lambda s: _restore_step(mgr, checkpoints, s), checkpoints, passthrough=(ExportError,))
        except WorkdirError as e:
            raise ExportError(str(e)) from e
    finally:
        mgr.close()
    for bad, why in skipped:
        warn(f"{checkpoints}/{bad} does not restore ({why}); using step {step}, the newest checkpoint that does "
             "(train.py on this workdir moves the damaged one aside)")
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
    entries = os.listdir(out) if os.path.isdir(out) else []
    if entries and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    # --overwrite replaces (deletes) OUT: only an earlier export, never someone's other files.
    if entries and (CONFIG_FILE not in entries or not set(entries) <= set(EXPORT_ENTRIES)):
        foreign = sorted(set(entries) - set(EXPORT_ENTRIES)) or entries
        raise ExportError(f"--out {out} is not an export (it holds {', '.join(sorted(foreign)[:6])}); "
                          "--overwrite replaces only an earlier export: choose another directory")


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
    quiet_abandoned_reads()
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            saved = ckptr.metadata(ckpt).item_metadata.tree
            variables = ckptr.restore(ckpt, args=ocp.args.PyTreeRestore(item=saved, restore_args=_as_numpy(saved)))
    except Exception as e:  # a damaged export: orbax and tensorstore raise ValueError, OSError, ...
        raise ExportError(f"{ckpt} does not restore ({reason(e)}); export the run again") from e
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
    try:
        written = _run(argv)
    except (ExportError, OSError) as e:  # OSError: e.g. no permission to write OUT
        print(f"export: {e}", file=sys.stderr)
        return 1
    if written is not None:
        print(f"exported step {written['step']} of {written['workdir']} to {written['out']}: {CONFIG_FILE}, "
              f"{ORBAX_DIR}/" + (f", {HF_DIR}/" if written["hf"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
