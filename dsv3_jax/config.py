"""The one typed configuration of the model.

`ModelConfig` is frozen and validated at construction, types strictly (a JSON `"false"` is not a
boolean, `64.0` not an integer, `true` not a number); presets in `configs/*.json` hold only its
field values. Quantities that follow from the fields (head sizes, KV-cache bytes, parameter counts,
the softmax scale) are properties, never stored twice. It says what a checkpoint's `config.json`
says and nothing about how to run the model: that is `dsv3_jax.runtime.Runtime`. Translation to and
from Hugging Face's `config.json` lives in `dsv3_jax.hf_config`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal


def _configs_dir() -> str:
    """configs/ beside the package in a checkout; dsv3_jax/configs in an installed wheel."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    if os.path.isdir(checkout):
        return checkout
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


CONFIGS_DIR = _configs_dir()

# How a run executed, written into model configs by versions before `Runtime` (dsv3_jax/runtime.py)
# was split off. Files that carry them still load; the values say nothing about the model.
LEGACY_RUNTIME_KEYS = ("dtype", "attention_impl", "moe_impl", "ep_fp8_dispatch", "fp8")

ScoreFunc = Literal["sigmoid", "softmax"]
GroupScore = Literal["top2_sum", "max"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Sizes.
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768  # dense FFN of the first `first_k_dense` layers
    moe_intermediate_size: int = 128  # one routed or shared expert
    num_layers: int = 4
    first_k_dense: int = 1
    # Multi-head latent attention (V2 report s.2.1). q_lora_rank = 0: plain query projection.
    num_heads: int = 8
    q_lora_rank: int = 128
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeek Sparse Attention (V3.2): the lightning indexer's heads, their dim, and how many keys each
    # query keeps. All 0: no indexer, dense MLA (V3, V2); a V3 config is a V3.2 one without it.
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    # DeepSeekMoE.
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 1
    topk_group: int = 1
    score_func: ScoreFunc = "sigmoid"
    # How a group is scored for group-limited routing: V3 sums each group's top-2 biased scores,
    # V2's `group_limited_greedy` takes the group maximum.
    group_score: GroupScore = "top2_sum"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # Whether the router carries V3's selection-only bias (`e_score_correction_bias`).
    router_bias: bool = True
    # Norms and positions.
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    # YaRN (rope_factor 1.0 = off). mscale_all_dim = 0: no softmax-temperature correction;
    # mscale or mscale_all_dim = 0: cos/sin take YaRN's default temperature (rope_attention_factor).
    rope_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # Multi-token prediction (V3 report s.2.2).
    mtp_depth: int = 1
    mtp_loss_weight: float = 0.3
    # Training-time balancing (V3 report s.2.1.2); used by the training loop.
    aux_loss_alpha: float = 0.0001
    bias_update_speed: float = 0.001
    init_std: float = 0.006
    tie_word_embeddings: bool = False
    # A label (the preset's name), not part of the model: two configs that differ only here are equal.
    name: str = dataclasses.field(default="custom", compare=False)

    def __post_init__(self):
        _check_types(self)
        _validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per layer and token by MLA: the normalised latent plus the rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        return self.kv_cache_dim * bytes_per_value * self.num_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def yarn_active(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def rope_attention_factor(self) -> float:
        """YaRN's scale on cos/sin: the mscale ratio when both are set (1.0 for DeepSeek's configs,
        where they are equal), else YaRN's default temperature 0.1 ln(s) + 1 (as transformers)."""
        if not self.yarn_active:
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.rope_factor, self.mscale) / yarn_mscale(self.rope_factor, self.mscale_all_dim)
        return yarn_mscale(self.rope_factor)

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.yarn_active:
            m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
            scale *= m * m
        return scale

    # ---- parameter counts ----------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        d, h = self.hidden_size, self.num_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * self.qk_head_dim
        else:
            q = d * h * self.qk_head_dim
        kv = d * self.kv_cache_dim + self.kv_lora_rank
        kv += self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv + h * self.v_head_dim * d

    @property
    def indexer_params(self) -> int:
        """The lightning indexer of one layer: wq_b on the q latent, wk and its LayerNorm (scale and
        bias), weights_proj. Kept apart from `attention_params`, which counts MLA alone."""
        if not self.has_indexer:
            return 0
        d, h, k = self.hidden_size, self.index_n_heads, self.index_head_dim
        return self.q_lora_rank * h * k + d * k + 2 * k + d * h

    def _block_params(self, moe: bool, active: bool) -> int:
        d = self.hidden_size
        norms_and_attention = 2 * d + self.attention_params + self.indexer_params
        if not moe:
            return norms_and_attention + 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        router = d * self.n_routed_experts + (self.n_routed_experts if self.router_bias else 0)
        return norms_and_attention + router + (routed + self.n_shared_experts) * expert

    def _count(self, active: bool, with_mtp: bool) -> int:
        d = self.hidden_size
        n = self.first_k_dense * self._block_params(False, active)
        n += self.num_moe_layers * self._block_params(True, active)
        n += self.vocab_size * d  # embedding
        n += d  # final norm
        if not self.tie_word_embeddings:
            n += self.vocab_size * d
        if with_mtp:
            # enorm, hnorm, eh_proj, the head's own norm, one MoE block (embedding, head shared).
            n += self.mtp_depth * (3 * d + 2 * d * d + self._block_params(True, active))
        return n

    @property
    def total_params(self) -> int:
        """All parameters of the main model and the MTP modules."""
        return self._count(active=False, with_mtp=True)

    @property
    def main_model_params(self) -> int:
        return self._count(active=False, with_mtp=False)

    @property
    def active_params(self) -> int:
        """Parameters one token touches in the main model (routed experts: only its top-k)."""
        return self._count(active=True, with_mtp=False)

    # ---- serialisation --------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def differences(self, other: ModelConfig) -> list[str]:
        """The fields in which two configs describe different models (`name` is only a label)."""
        return sorted(f.name for f in dataclasses.fields(self)
                      if f.compare and getattr(self, f.name) != getattr(other, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        if not isinstance(values, dict):
            raise ValueError(f"ModelConfig: expected a JSON object of fields, got {json_type(values)}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in LEGACY_RUNTIME_KEYS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
        return cls(**values)

    @classmethod
    def from_json(cls, name_or_path: str) -> ModelConfig:
        """A preset name from configs/ (e.g. "tiny") or a path to a JSON file of fields."""
        path = name_or_path
        if not os.path.isfile(path):
            path = os.path.join(CONFIGS_DIR, f"{name_or_path}.json")
        if not os.path.isfile(path) and os.path.isdir(name_or_path):
            raise ValueError(f"{name_or_path} is a directory; expected a JSON file of ModelConfig fields or a "
                             f"preset name ({', '.join(list_presets())})")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no config file {name_or_path!r} and no preset of that name; presets: {list_presets()}")
        values = _read_json(path)
        try:
            if isinstance(values, dict):
                values.setdefault("name", os.path.splitext(os.path.basename(path))[0])
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _read_json(path: str) -> Any:
    """A JSON file's value; anything unreadable is a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not a JSON file ({e})") from None


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (0.1 * mscale * ln(s) + 1)."""
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def list_presets() -> list[str]:
    if not os.path.isdir(CONFIGS_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIGS_DIR) if f.endswith(".json"))


def _fail(field: str, value: Any, rule: str):
    raise ValueError(f"ModelConfig.{field} = {value!r}: {rule}")


def json_type(value: Any) -> str:
    """How a value reads in JSON, for messages ("a string", "an array")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# The annotation of each field (a string under `from __future__ import annotations`) -> what it takes.
_RULES = {"int": "must be an integer", "float": "must be a number", "bool": "must be true or false",
          "str": "must be a string", "ScoreFunc": "must be a string", "GroupScore": "must be a string"}


def _type_ok(kind: str, value: Any) -> bool:
    """Strict: a bool is not a number, 64.0 is not an integer, "false" is not a boolean."""
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _check_types(c: ModelConfig) -> None:
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        if not _type_ok(f.type, v):
            _fail(f.name, v, f"{_RULES[f.type]}, not {json_type(v)}")
        if f.type == "float":
            if not math.isfinite(v):
                _fail(f.name, v, "must be a finite number")
            object.__setattr__(c, f.name, float(v))  # 10000 in a JSON file is 10000.0


def _validate(c: ModelConfig) -> None:
    positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                "n_group", "topk_group", "original_max_position_embeddings"]
    for name in positive:
        v = getattr(c, name)
        if v <= 0:
            _fail(name, v, "must be a positive integer")
    non_negative = ["intermediate_size", "moe_intermediate_size", "first_k_dense", "q_lora_rank",
                    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "mtp_depth",
                    "index_n_heads", "index_head_dim", "index_topk"]
    for name in non_negative:
        v = getattr(c, name)
        if v < 0:
            _fail(name, v, "must be a non-negative integer")
    if c.first_k_dense > c.num_layers:
        _fail("first_k_dense", c.first_k_dense, f"must be <= num_layers ({c.num_layers})")
    if c.first_k_dense > 0 and c.intermediate_size == 0:
        _fail("intermediate_size", 0, "must be > 0 when there are dense layers (first_k_dense > 0)")
    if c.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", c.qk_rope_head_dim, "must be even (RoPE rotates pairs)")
    if c.num_moe_layers > 0 or c.mtp_depth > 0:
        _validate_moe(c)
    _validate_indexer(c)
    if c.score_func not in ("sigmoid", "softmax"):
        _fail("score_func", c.score_func, "must be 'sigmoid' or 'softmax'")
    if c.group_score not in ("top2_sum", "max"):
        _fail("group_score", c.group_score, "must be 'top2_sum' or 'max'")
    if c.rope_factor < 1.0:
        _fail("rope_factor", c.rope_factor, "must be >= 1.0 (1.0 disables YaRN)")
    if c.mscale < 0 or c.mscale_all_dim < 0:
        _fail("mscale", (c.mscale, c.mscale_all_dim), "mscale and mscale_all_dim must be >= 0")
    for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "beta_fast", "beta_slow", "init_std"):
        if getattr(c, name) <= 0:
            _fail(name, getattr(c, name), "must be > 0")
    for name in ("mtp_loss_weight", "aux_loss_alpha", "bias_update_speed"):
        if getattr(c, name) < 0:
            _fail(name, getattr(c, name), "must be >= 0")


def _validate_indexer(c: ModelConfig) -> None:
    sizes = {"index_n_heads": c.index_n_heads, "index_head_dim": c.index_head_dim, "index_topk": c.index_topk}
    if not any(sizes.values()):
        return
    for name, v in sizes.items():
        if v == 0:
            _fail(name, v, f"must be > 0 when the model has an indexer ({', '.join(sizes)}: all 0 or all > 0)")
    if c.index_head_dim < c.qk_rope_head_dim:
        _fail("index_head_dim", c.index_head_dim,
              f"must be >= qk_rope_head_dim ({c.qk_rope_head_dim}): RoPE rotates its first qk_rope_head_dim dims")
    if not c.q_lora_rank:
        _fail("q_lora_rank", 0, "must be > 0 when the model has an indexer (its queries read the q latent)")


def _validate_moe(c: ModelConfig) -> None:
    if c.n_routed_experts <= 0:
        _fail("n_routed_experts", c.n_routed_experts, "must be > 0 when the model has MoE layers")
    if c.moe_intermediate_size <= 0:
        _fail("moe_intermediate_size", c.moe_intermediate_size, "must be > 0 for MoE layers")
    if not 0 < c.num_experts_per_tok <= c.n_routed_experts:
        _fail("num_experts_per_tok", c.num_experts_per_tok,
              f"must be in 1..n_routed_experts ({c.n_routed_experts})")
    if c.n_routed_experts % c.n_group:
        _fail("n_group", c.n_group, f"must divide n_routed_experts ({c.n_routed_experts})")
    if c.topk_group > c.n_group:
        _fail("topk_group", c.topk_group, f"must be <= n_group ({c.n_group})")
    if c.num_experts_per_tok > c.topk_group * c.experts_per_group:
        _fail("num_experts_per_tok", c.num_experts_per_tok,
              f"must be <= topk_group * experts per group ({c.topk_group * c.experts_per_group})")
    if c.n_group > 1 and c.group_score == "top2_sum" and c.experts_per_group < 2:
        _fail("group_score", c.group_score, "'top2_sum' needs at least 2 experts per group")
