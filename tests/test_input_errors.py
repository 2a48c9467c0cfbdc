"""Bad input through the real commands: one line naming the input and the rule, a non-zero exit, no
traceback, nothing written. Config files are typed strictly, a Hugging Face directory must account
for every tensor it holds, and every numeric flag has a rule checked before anything is compiled.

Each case runs before any compilation: `train.py` and `infer.py` as subprocesses for the cases the
issue names, the cli modules' `main` in this process for the rest of each table."""
import json
import os
import struct
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from dsv3_jax.config import ModelConfig
from dsv3_jax.data import tokenizer
from dsv3_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.hf_config import config_from_hf, config_to_hf
from dsv3_jax.infer import cli as infer_cli
from dsv3_jax.model import init_variables
from dsv3_jax.safetensors_io import SafetensorsDir, SafetensorsError, SafetensorsFile
from dsv3_jax.train import cli as train_cli
from dsv3_jax.train.loop import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = json.load(open(os.path.join(REPO, "configs", "tiny.json")))


@pytest.fixture(autouse=True)
def _keep_environment(monkeypatch):
    """infer's main adds its decode XLA flags to the environment: keep them out of later tests."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def _snapshot(root) -> dict:
    """Every file under `root` with its size and modification time (absent root: {})."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _one_line(r: subprocess.CompletedProcess, prefix: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(prefix), r.stderr[-3000:]
    return lines[0]


def _exit_line(call) -> str:
    """The one line a cli `main` exits with (sys.exit(message): status 1, the message on stderr)."""
    with pytest.raises(SystemExit) as e:
        call()
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for k in range(3):
        (d / f"part{k}.py").write_text("".join(f"def f{i}(x):\n    return x + {i * k}\n\n" for i in range(60)))
    return str(d)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad input files: a tokenizer.json that is not one, a prompts file in Latin-1, config files."""
    d = tmp_path_factory.mktemp("files")
    (d / "garbage_tokenizer.json").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "bool_as_string.json").write_text(json.dumps({**TINY, "norm_topk_prob": "false"}))
    (d / "list.json").write_text(json.dumps([TINY]))
    (d / "a_directory").mkdir()
    return d


# -- train.py -----------------------------------------------------------------------------------------

def _train(tmp_path, corpus, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), f"--workdir={tmp_path / 'wd'}",
                           f"--data={corpus}", "--steps=2", "--batch_size=2", "--seq_len=16", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--lr=-1"], "train.py: --lr must be a finite number > 0, got -1.0"),
    (["--steps=-5"], "train.py: --steps must be >= 1, got -5"),
    (["--tokenizer={files}/garbage_tokenizer.json"], "not a Hugging Face tokenizer.json"),
    (["--config={files}/bool_as_string.json"],
     "bool_as_string.json: ModelConfig.norm_topk_prob = 'false': must be true or false, not a string"),
])
def test_train_py_refuses_in_one_line_and_writes_nothing(tmp_path, corpus, files, args, message):
    r = _train(tmp_path, corpus, *[a.format(files=files) for a in args])
    assert message in _one_line(r, "train.py: ")
    assert not os.path.exists(tmp_path / "wd")


class TrainFlags(types.SimpleNamespace):
    """train.py's flags as absl would hand them to cli.main; a flag not given here has TrainConfig's
    default (so a flag added to train.py later does not break these tests)."""

    def __getitem__(self, name):  # absl's FLAGS["verbosity"].present
        return types.SimpleNamespace(present=True)

    def __getattr__(self, name):
        defaults = {"config": TrainConfig.model, "coordinator_address": None, "num_processes": None,
                    "process_id": None, "initialization_timeout": 300, "heartbeat_timeout": 100}
        return defaults[name] if name in defaults else getattr(TrainConfig, name)


def _train_main(tmp_path, corpus, **kw) -> str:
    base = dict(workdir=str(tmp_path / "wd"), data=[corpus], steps=2, batch_size=2, seq_len=16, sample_tokens=0)
    f = TrainFlags(**{**base, **kw})
    line = _exit_line(lambda: train_cli.main(["train.py"], f))
    assert line.startswith("train.py: ") and not os.path.exists(tmp_path / "wd")
    return line


@pytest.mark.parametrize("flag,value,rule", [
    ("steps", 0, ">= 1"), ("batch_size", 0, ">= 1"), ("seq_len", 0, ">= 1"), ("seq_len", -3, ">= 1"),
    ("lr", 0.0, "a finite number > 0"), ("lr", float("nan"), "a finite number > 0"),
    ("lr", float("inf"), "a finite number > 0"), ("warmup_steps", -1, ">= 0"), ("seed", -1, ">= 0"),
    ("checkpoint_every", -1, ">= 0 (0: only at the end)"), ("eval_every", 0, ">= 1"), ("stop_after", 0, ">= 1"),
    ("sample_tokens", -1, ">= 0 (0: none)"), ("grad_accum", 0, ">= 1"), ("num_processes", 0, ">= 1"),
    ("initialization_timeout", 0, ">= 1 (seconds)"), ("heartbeat_timeout", -1, ">= 1 (seconds)"),
])
def test_every_numeric_train_flag_has_its_rule(tmp_path, corpus, flag, value, rule):
    assert _train_main(tmp_path, corpus, **{flag: value}) == f"train.py: --{flag} must be {rule}, got {value}"


def test_every_numeric_train_flag_is_covered():
    numeric = {"steps", "batch_size", "seq_len", "lr", "warmup_steps", "seed", "checkpoint_every", "eval_every",
               "stop_after", "sample_tokens", "grad_accum", "num_processes", "initialization_timeout",
               "heartbeat_timeout"}
    assert set(train_cli.FLAG_RULES) == numeric


@pytest.mark.parametrize("name,content,message", [
    ("list.json", None, "list.json: ModelConfig: expected a JSON object of fields, got an array"),
    ("a_directory", None, "a_directory is a directory; expected a JSON file"),
    ("float_as_string.json", {"rope_theta": "10000"},
     "ModelConfig.rope_theta = '10000': must be a number, not a string"),
    ("int_as_float.json", {"hidden_size": 64.0}, "ModelConfig.hidden_size = 64.0: must be an integer, not a float"),
    ("bool_as_int.json", {"num_layers": True}, "ModelConfig.num_layers = True: must be an integer, not a boolean"),
    ("router_bias.json", {"router_bias": "false"}, "ModelConfig.router_bias = 'false': must be true or false"),
    ("int_as_bool.json", {"tie_word_embeddings": 0}, "tie_word_embeddings = 0: must be true or false, not an integer"),
    ("not_json.json", "{'hidden_size': 64}", "not_json.json: not a JSON file"),
])
def test_bad_config_files_are_one_line_naming_file_and_field(tmp_path, corpus, files, name, content, message):
    path = files / name
    if isinstance(content, dict):
        path.write_text(json.dumps({**TINY, **content}))
    elif isinstance(content, str):
        path.write_text(content)
    line = _train_main(tmp_path, corpus, config=str(path))
    assert line.startswith(f"train.py: --config: {path}") and message in line


@pytest.mark.parametrize("args,message", [
    (["--files", "/no/such/dir"], "corpus spec '/no/such/dir' matches no text file"),
    (["--vocab_size", "10"], "vocab_size = 10: a byte-level BPE needs at least 257"),
    (["--out", "{tmp}"], "is a directory"),
])
def test_tokenizer_trainer_bad_input_is_one_line(tmp_path, corpus, args, message):
    argv = ["--files", corpus, "--vocab_size", "300", "--out", str(tmp_path / "tok.json")]
    line = _exit_line(lambda: tokenizer.main(argv + [a.format(tmp=tmp_path) for a in args]))
    assert line.startswith("python -m dsv3_jax.data.tokenizer: ") and message in line
    assert os.listdir(tmp_path) == []


# -- ModelConfig and config.json types ----------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("norm_topk_prob", "false", "must be true or false, not a string"),
    ("router_bias", 1, "must be true or false, not an integer"),
    ("num_heads", 4.0, "must be an integer, not a float"),
    ("vocab_size", False, "must be an integer, not a boolean"),
    ("rms_norm_eps", True, "must be a number, not a boolean"),
    ("rope_theta", None, "must be a number, not null"),
    ("mtp_loss_weight", float("nan"), "must be a finite number"),
    ("score_func", ["sigmoid"], "must be a string, not an array"),
    ("name", 3, "must be a string, not an integer"),
    ("init_std", 0.0, "must be > 0"),
    ("rope_theta", -1.0, "must be > 0"),
    ("aux_loss_alpha", -0.1, "must be >= 0"),
])
def test_model_config_types_are_strict(field, value, message):
    with pytest.raises(ValueError, match=f"ModelConfig.{field} = .*: {message}"):
        ModelConfig.from_dict({**TINY, field: value})


def test_an_integer_where_a_float_belongs_is_that_float():
    cfg = ModelConfig.from_dict({**TINY, "rope_theta": 10000, "routed_scaling_factor": 2})
    assert isinstance(cfg.rope_theta, float) and cfg.rope_theta == 10000.0
    assert cfg == ModelConfig.from_dict({**TINY, "rope_theta": 10000.0, "routed_scaling_factor": 2.0})


@pytest.mark.parametrize("key,value,message", [
    ("norm_topk_prob", "false", "norm_topk_prob = 'false': must be true or false, not a string"),
    ("tie_word_embeddings", "false", "tie_word_embeddings = 'false': must be true or false"),
    ("num_hidden_layers", 2.0, "num_hidden_layers = 2.0: must be an integer, not a float"),
    ("hidden_size", "64", "hidden_size = '64': must be an integer, not a string"),
    ("routed_scaling_factor", "2.5", "routed_scaling_factor = '2.5': must be a number, not a string"),
    ("rms_norm_eps", True, "rms_norm_eps = True: must be a number, not a boolean"),
    ("attention_bias", "false", "attention_bias = 'false': must be true or false"),
    ("rope_parameters", [1], "rope_parameters = [1]: must be an object"),
    ("topk_method", "top_p", "topk_method 'top_p' is not supported"),
    ("vocab_size", None, "vocab_size is missing"),
])
def test_hf_config_types_are_strict(key, value, message):
    hf = {**config_to_hf(ModelConfig.from_dict(TINY)), key: value}
    with pytest.raises(ValueError, match="config.json: " + message.replace("[", r"\[").replace("(", r"\(")):
        config_from_hf(hf)


def test_hf_config_that_is_not_an_object():
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got an array"):
        config_from_hf([])


# -- Hugging Face directories and safetensors files -----------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny preset (2 layers and an MTP layer, model.layers.2) saved in DeepSeek's layout."""
    cfg = ModelConfig.from_dict(TINY)
    d = str(tmp_path_factory.mktemp("hf") / "tiny")
    save_hf_checkpoint(cfg, init_variables(cfg, jax.random.PRNGKey(0)), d)
    return d


def _copy_hf(hf_dir, dst, config=None, tensors=None, safetensors_bytes=None) -> str:
    """A copy of `hf_dir` with config.json updated by `config`, tensors edited by `tensors(dict)`, or
    model.safetensors replaced by `safetensors_bytes`."""
    os.makedirs(dst)
    hf = json.load(open(os.path.join(hf_dir, "config.json")))
    json.dump({**hf, **(config or {})}, open(os.path.join(dst, "config.json"), "w"))
    out = os.path.join(dst, "model.safetensors")
    if safetensors_bytes is not None:
        open(out, "wb").write(safetensors_bytes)
        return str(dst)
    src = SafetensorsDir(hf_dir)
    named = {n: np.array(src.get(n)) for n in src.names()}
    if tensors:
        tensors(named)
    save_file(named, out)
    return str(dst)


@pytest.mark.parametrize("layers,message", [
    (3, "config.json says num_hidden_layers = 3, but the safetensors files hold 2 decoder layer(s) "
        "(model.layers.0..1) and 1 MTP layer(s) (model.layers.2)"),
    (1, "config.json says num_hidden_layers = 1, but the safetensors files hold 2 decoder layer(s) "
        "(model.layers.0..1) and 1 MTP layer(s) (model.layers.2)"),
])
def test_layer_count_contradicting_the_files_is_an_error(hf_dir, tmp_path, layers, message):
    bad = _copy_hf(hf_dir, tmp_path / "bad", config={"num_hidden_layers": layers})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_checkpoint(bad)


def test_every_tensor_is_accounted_for(hf_dir, tmp_path):
    extra = _copy_hf(hf_dir, tmp_path / "extra",
                     tensors=lambda t: t.update({"model.layers.0.mlp.bogus.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) .* not part of the model .*: model.layers.0.mlp.bogus"):
        load_hf_checkpoint(extra)
    no_mtp = _copy_hf(hf_dir, tmp_path / "no_mtp", config={"num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="hold 1 MTP layer.*num_nextn_predict_layers is 0"):
        load_hf_checkpoint(no_mtp)


def test_fp8_scales_of_another_block_size_are_refused(hf_dir, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    bad = _copy_hf(hf_dir, tmp_path / "bad", tensors=lambda t: t.update(
        {name.replace("weight", "weight_scale_inv"): np.ones((2, 1), np.float32)}))
    with pytest.raises(ValueError, match=r"up_proj.weight_scale_inv has shape \(2, 1\); 128x128 block scales"):
        load_hf_checkpoint(bad)


def _safetensors_bytes(hf_dir) -> bytes:
    return open(os.path.join(hf_dir, "model.safetensors"), "rb").read()


BROKEN = {
    "short": lambda good: b"\x01\x02\x03",
    "absurd_header": lambda good: struct.pack("<Q", 1 << 62) + good[8:],
    "truncated": lambda good: good[: len(good) // 2],
    "header_not_json": lambda good: struct.pack("<Q", 4) + b"\xff\xfe{[" + good[12:],
}
BROKEN_MESSAGE = {
    "short": "3 bytes, too short for a safetensors file",
    "absurd_header": "header length 4611686018427387904 is past the end",
    "truncated": "of the data, but the file holds",
    "header_not_json": "header is not JSON",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_safetensors_files_are_named(hf_dir, tmp_path, kind):
    path = tmp_path / "model.safetensors"
    path.write_bytes(BROKEN[kind](_safetensors_bytes(hf_dir)))
    with pytest.raises(SafetensorsError, match=f"{path}: .*{BROKEN_MESSAGE[kind]}"):
        SafetensorsFile(str(path))


def test_a_tensor_in_two_files_without_an_index_is_refused(hf_dir, tmp_path):
    d = _copy_hf(hf_dir, tmp_path / "two")
    save_file({"model.norm.weight": np.ones(64, np.float32)}, os.path.join(d, "old-shard.safetensors"))
    with pytest.raises(SafetensorsError, match="tensor model.norm.weight is in both model.safetensors and "
                                               "old-shard.safetensors, and no model.safetensors.index.json"):
        SafetensorsDir(d)


def test_an_index_placing_a_tensor_in_the_wrong_file_is_named(hf_dir, tmp_path):
    d = _copy_hf(hf_dir, tmp_path / "indexed")
    save_file({"x": np.ones(3, np.float32)}, os.path.join(d, "other.safetensors"))
    names = SafetensorsFile(os.path.join(d, "model.safetensors")).header
    weight_map = {n: "other.safetensors" if n == "model.norm.weight" else "model.safetensors" for n in names}
    json.dump({"weight_map": weight_map}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(SafetensorsError, match="other.safetensors: holds no tensor model.norm.weight"):
        load_hf_checkpoint(d)
    open(os.path.join(d, "model.safetensors.index.json"), "w").write("[]")
    with pytest.raises(SafetensorsError, match="model.safetensors.index.json: not a safetensors index"):
        SafetensorsDir(d)


# -- infer.py -----------------------------------------------------------------------------------------

def _infer(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "infer.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_infer_py_truncated_safetensors_names_the_file(hf_dir, tmp_path):
    good = _safetensors_bytes(hf_dir)
    bad = _copy_hf(hf_dir, tmp_path / "bad", safetensors_bytes=good[: len(good) // 2])
    before = _snapshot(bad)
    line = _one_line(_infer(f"--checkpoint={bad}", "--prompt=x", "--tokenizer=byte"), "infer.py: ")
    assert f"{bad}/model.safetensors: tensor" in line and "(truncated?)" in line
    assert _snapshot(bad) == before


@pytest.mark.parametrize("args,message", [
    (["--tokenizer={files}/garbage_tokenizer.json", "--prompt=x"],
     "garbage_tokenizer.json: not a Hugging Face tokenizer.json"),
    (["--tokenizer=byte", "--prompts_file={files}/latin1.txt"],
     "infer.py: --prompts_file {files}/latin1.txt: not UTF-8 text (byte 3: invalid continuation byte)"),
])
def test_infer_py_bad_tokenizer_or_prompts_file(hf_dir, files, args, message):
    r = _infer(f"--checkpoint={hf_dir}", *[a.format(files=files) for a in args])
    assert message.format(files=files) in _one_line(r, "infer.py: ")


class InferFlags(types.SimpleNamespace):
    def __getitem__(self, name):  # absl's FLAGS["verbosity"].present
        return types.SimpleNamespace(present=True)


def _infer_main(**kw) -> str:
    base = dict(checkpoint=None, prompt=["x"], prompts_file=None, prompt_ids=[], tokenizer="byte",
                max_new_tokens=16, temperature=0.0, top_p=1.0, top_k=0, seed=0, speculative="none",
                compare_plain=True, weights="fp32", steps_per_call=8, experts="auto", attention="auto", json=True,
                kv_cache=None, index_cache=None)
    line = _exit_line(lambda: infer_cli.main(["infer.py"], InferFlags(**{**base, **kw})))
    assert line.startswith("infer.py: ")
    return line


@pytest.mark.parametrize("flag,value,rule", [
    ("max_new_tokens", 0, ">= 1"), ("max_new_tokens", -5, ">= 1"),
    ("temperature", -0.5, "a finite number >= 0 (0: greedy)"),
    ("temperature", float("inf"), "a finite number >= 0 (0: greedy)"),
    ("temperature", float("nan"), "a finite number >= 0 (0: greedy)"), ("top_p", 0.0, "in (0, 1]"),
    ("top_p", 1.5, "in (0, 1]"),
    ("top_k", -1, ">= 0 (0: all)"), ("steps_per_call", 0, ">= 1"),
])
def test_every_numeric_infer_flag_has_its_rule(tmp_path, flag, value, rule):
    # Checked before the checkpoint is even looked at (there is none here).
    line = _infer_main(checkpoint=str(tmp_path / "none"), **{flag: value})
    assert line == f"infer.py: --{flag} must be {rule}, got {value}"


@pytest.mark.parametrize("config,message", [
    ({"num_hidden_layers": 3}, "config.json says num_hidden_layers = 3, but the safetensors files hold 2 decoder"),
    ({"num_hidden_layers": 1}, "config.json says num_hidden_layers = 1, but the safetensors files hold 2 decoder"),
    ({"norm_topk_prob": "false"}, "config.json: norm_topk_prob = 'false': must be true or false, not a string"),
])
def test_infer_hf_config_contradicting_or_mistyped(hf_dir, tmp_path, config, message):
    bad = _copy_hf(hf_dir, tmp_path / "bad", config=config)
    assert message in _infer_main(checkpoint=bad)


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_infer_broken_safetensors_names_the_file(hf_dir, tmp_path, kind):
    bad = _copy_hf(hf_dir, tmp_path / "bad", safetensors_bytes=BROKEN[kind](_safetensors_bytes(hf_dir)))
    line = _infer_main(checkpoint=bad)
    assert f"{bad}/model.safetensors: " in line and BROKEN_MESSAGE[kind] in line


def test_infer_export_whose_model_config_is_a_list(tmp_path):
    (tmp_path / "orbax").mkdir()
    (tmp_path / "model_config.json").write_text(json.dumps([TINY]))
    line = _infer_main(checkpoint=str(tmp_path))
    assert line == (f"infer.py: --checkpoint {tmp_path}: {tmp_path}/model_config.json: ModelConfig: expected a "
                    "JSON object of fields, got an array")
