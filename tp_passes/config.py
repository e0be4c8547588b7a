"""`TPConfig`: what to rewrite, built from torch.compile options, env vars or a dict.

Every source goes through one parser (`_parse_value`), so a value means the same thing
whether it comes from `options={"oproj_tp": 2}`, `TP_PASSES_OPROJ_TP=2` or vllm-ascend's
`finegrained_tp_config`. Bad input raises `ValueError` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

Auto = Literal["auto"]
BoolOrAuto = Union[bool, Auto]

ENV_PREFIX = "TP_PASSES_"
INNER_COMPILERS = ("inductor", "eager", "torchair")

# vllm-ascend spellings -> our field names, so `finegrained_tp_config` moves over unchanged.
VLLM_ASCEND_ALIASES = {
    "oproj_tensor_parallel_size": "oproj_tp",
    "lmhead_tensor_parallel_size": "lmhead_tp",
    "embedding_tensor_parallel_size": "embedding_tp",
    "mlp_tensor_parallel_size": "mlp_tp",
    "flashcomm2_oproj_tensor_parallel_size": "flashcomm2",
}

_SIZE_FIELDS = ("oproj_tp", "lmhead_tp", "embedding_tp", "mlp_tp", "flashcomm2", "prefetch_step")
_AUTO_FIELDS = ("sequence_parallel", "fuse_mm_reduce_scatter", "shared_weights_apply")
_BOOL_FIELDS = ("release_weights", "strict", "dump", "include_draft_and_vision")
MODULE_NAME_KEYS = ("oproj_tp", "embedding_tp", "lmhead_tp", "mlp_tp")
_STR_FIELDS = ("inner", "dump_dir", "shared_weights_group")
SHARED_WEIGHT_GROUPS = ("stage", "dp", "tp")


@dataclass(frozen=True)
class TPConfig:
    """Which tensor-parallel rewrites run, and how the result is compiled.

    Module TP sizes (`oproj_tp`, `lmhead_tp`, `embedding_tp`, `mlp_tp`) are the number of
    data-parallel ranks a module's weight is sharded over; 0 turns the rewrite off.
    `flashcomm2` is the o_proj TP size inside FlashComm2 (vllm-ascend's
    `flashcomm2_oproj_tensor_parallel_size`); 0 turns it off.
    """

    oproj_tp: int = 0
    lmhead_tp: int = 0
    embedding_tp: int = 0
    mlp_tp: int = 0
    flashcomm2: int = 0
    sequence_parallel: BoolOrAuto = "auto"
    fuse_mm_reduce_scatter: BoolOrAuto = "auto"
    inner: str = "inductor"
    release_weights: bool = False
    strict: bool = False
    dump: bool = False
    dump_dir: str = "./tp_passes_dump"
    # override the module names each rewrite selects, e.g. {"oproj_tp": ["attn.c_proj"]}
    # (keys: oproj_tp, embedding_tp, lmhead_tp, mlp_tp; mlp_tp names the MLP module)
    module_names: dict[str, tuple[str, ...]] | None = None
    include_draft_and_vision: bool = False  # select under mtp/vision/visual paths too
    # shared-weight series: module names whose weights form one series each (e.g.
    # ("o_proj",)); layer i is kept on rank i mod k of the group, the others receive it
    # into a ring of prefetch_step + 1 windows, broadcast prefetch_step layers ahead
    shared_weights: tuple[str, ...] = ()
    # the ranks that share a series: "stage" (every DP x PCP x TP rank of a pipeline stage:
    # a weight replicated there, e.g. FlashComm2's full-width o_proj), "dp" (the same TP
    # shard across DP ranks) or "tp"; the weights must be equal on them (checked)
    shared_weights_group: str = "stage"
    prefetch_step: int = 1
    # "auto": a series applies only where every rank of its group holds fewer layer-sized
    # buffers (owned layers + windows) than the series has layers; True: wherever it can
    shared_weights_apply: BoolOrAuto = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.shared_weights, list):  # lists from JSON / dicts, hashable here
            object.__setattr__(self, "shared_weights", tuple(self.shared_weights))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        if self.flashcomm2 and self.oproj_tp:
            raise ValueError(
                f"TPConfig: flashcomm2={self.flashcomm2} and oproj_tp={self.oproj_tp} both "
                "rewrite o_proj; enable at most one of them"
            )

    # -- constructors -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base: TPConfig | None = None) -> TPConfig:
        """Overlay `d` on `base` (defaults if None).

        Accepts our field names, vllm-ascend's `finegrained_tp_config` keys, and a nested
        `finegrained_tp_config` dict. String values are parsed as env values are.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"TPConfig.from_dict: expected a mapping, got {type(d).__name__}")
        updates: dict[str, Any] = {}
        for key, value in d.items():
            if key == "finegrained_tp_config":
                if not isinstance(value, Mapping):
                    raise ValueError(
                        f"TPConfig: 'finegrained_tp_config' must be a mapping, got {value!r}"
                    )
                nested = cls.from_dict(value, base=cls())
                updates.update(_non_default(nested))
                continue
            name = VLLM_ASCEND_ALIASES.get(key, key)
            if name not in _FIELD_NAMES:
                raise ValueError(
                    f"TPConfig: unknown key {key!r}; known keys: {', '.join(sorted(_FIELD_NAMES))}"
                )
            updates[name] = _parse_value(key, name, value)
        return dataclasses.replace(base or cls(), **updates)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, base: TPConfig | None = None
    ) -> TPConfig:
        """Read `TP_PASSES_<FIELD>` variables (e.g. `TP_PASSES_OPROJ_TP=2`)."""
        environ = os.environ if environ is None else environ
        d: dict[str, str] = {}
        for var, value in environ.items():
            if not var.startswith(ENV_PREFIX):
                continue
            name = var[len(ENV_PREFIX) :].lower()
            if name not in _FIELD_NAMES:
                raise ValueError(
                    f"TPConfig: unknown environment variable {var}={value!r}; known: "
                    + ", ".join(ENV_PREFIX + n.upper() for n in sorted(_FIELD_NAMES))
                )
            try:
                cls.from_dict({name: value})
            except ValueError as e:
                raise ValueError(f"TPConfig: environment variable {var}={value!r}: {e}") from None
            d[name] = value
        return cls.from_dict(d, base=base)

    @classmethod
    def resolve(
        cls, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> TPConfig:
        """The backend's order: `options` over `TP_PASSES_*` env vars over defaults."""
        return cls.from_dict(options or {}, base=cls.from_env(environ))

    # -- derived ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def names_for(self, kind: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Module names selected for `kind` (a MODULE_NAME_KEYS entry)."""
        if self.module_names and kind in self.module_names:
            return tuple(self.module_names[kind])
        return default

    def module_tp_sizes(self) -> dict[str, int]:
        """Enabled module TP rewrites: registry group name -> k."""
        named = {
            "otp": self.oproj_tp,
            "lmheadtp": self.lmhead_tp,
            "embedtp": self.embedding_tp,
            "mlptp": self.mlp_tp,
        }
        return {name: k for name, k in named.items() if k > 0}


_FIELD_NAMES = frozenset(f.name for f in fields(TPConfig))


def _non_default(cfg: TPConfig) -> dict[str, Any]:
    default = TPConfig()
    return {
        f.name: getattr(cfg, f.name)
        for f in fields(cfg)
        if getattr(cfg, f.name) != getattr(default, f.name)
    }


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _parse_value(key: str, name: str, value: Any) -> Any:
    """Convert a string (env var, CLI) to the field's type; leave typed values alone."""
    if not isinstance(value, str):
        return value
    if name == "shared_weights":  # "o_proj,down_proj" or a JSON list
        text = value.strip()
        if text.startswith("["):
            import json

            try:
                return tuple(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"TPConfig: {key} must be names or a JSON list: {e}") from None
        return tuple(n.strip() for n in text.split(",") if n.strip())
    if name == "module_names":
        import json

        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(
                f'TPConfig: {key} must be JSON, e.g. \'{{"oproj_tp": ["c_proj"]}}\': {e}'
            ) from None
    text = value.strip().lower()
    if name in _SIZE_FIELDS:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"TPConfig: {key} must be an integer, got {value!r}") from None
    if name in _AUTO_FIELDS or name in _BOOL_FIELDS:
        if name in _AUTO_FIELDS and text == "auto":
            return "auto"
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        allowed = "true/false" + ("/auto" if name in _AUTO_FIELDS else "")
        raise ValueError(f"TPConfig: {key} must be {allowed}, got {value!r}")
    return value


def _check_type(name: str, value: Any) -> None:
    if name in _SIZE_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"TPConfig: {name} must be an int, got {value!r}")
        if value < 0:
            off = "" if name == "prefetch_step" else " (0 = off)"
            raise ValueError(f"TPConfig: {name} must be >= 0{off}, got {value}")
    elif name in _AUTO_FIELDS:
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"TPConfig: {name} must be True, False or 'auto', got {value!r}")
    elif name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"TPConfig: {name} must be a bool, got {value!r}")
    elif name == "module_names":
        if value is None:
            return
        if not isinstance(value, Mapping):
            raise ValueError(f"TPConfig: module_names must be a mapping, got {value!r}")
        for k, names in value.items():
            if k not in MODULE_NAME_KEYS:
                raise ValueError(
                    f"TPConfig: module_names key {k!r} is not one of {', '.join(MODULE_NAME_KEYS)}"
                )
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"TPConfig: module_names[{k!r}] must be a list of names, got {names!r}"
                )
    elif name == "shared_weights":
        if isinstance(value, str) or not all(isinstance(n, str) and n for n in value):
            raise ValueError(
                f"TPConfig: shared_weights must be a list of module names, got {value!r}"
            )
    elif name in _STR_FIELDS:
        if not isinstance(value, str):
            raise ValueError(f"TPConfig: {name} must be a string, got {value!r}")
        if name == "shared_weights_group" and value not in SHARED_WEIGHT_GROUPS:
            raise ValueError(
                f"TPConfig: shared_weights_group must be one of {', '.join(SHARED_WEIGHT_GROUPS)}, "
                f"got {value!r}"
            )
        if name == "inner" and value not in INNER_COMPILERS:
            raise ValueError(
                f"TPConfig: inner must be one of {', '.join(INNER_COMPILERS)}, got {value!r}"
            )


# -- hosts: where the backend runs --------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """Where a compile runs, as an integration describes it: the config to use, and the
    rewrites it cannot run there (rewrite name -> why; reported as the skip reason)."""

    name: str
    config: TPConfig
    refused: Mapping[str, str] = field(default_factory=dict)
    # Inductor settings the framework compiles with when it compiles without us (vLLM's
    # `inductor_compile_config`): the inner compile uses them too, so the graphs we leave
    # alone compile exactly as they would have
    inductor_options: Mapping[str, Any] = field(default_factory=dict)


HostProvider = Callable[[Mapping[str, Any] | None], Host | None]
_HOSTS: list[HostProvider] = []  # registered by integrations (the vLLM plugin)


def register_host(provider: HostProvider) -> None:
    """`provider(options)` returns a Host when its framework is running this compile, else
    None. Idempotent. The core never imports an integration; integrations register here."""
    if provider not in _HOSTS:
        _HOSTS.append(provider)


def resolve_host(options: Mapping[str, Any] | None = None) -> Host:
    """The first registered host that claims this compile, else plain torch.compile."""
    for provider in _HOSTS:
        if (host := provider(options)) is not None:
            return host
    return Host("torch", TPConfig.resolve(options))
