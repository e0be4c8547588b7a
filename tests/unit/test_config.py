import pytest

from tp_passes import TPConfig


def test_defaults_are_auto_and_off():
    c = TPConfig()
    assert (c.oproj_tp, c.lmhead_tp, c.embedding_tp, c.mlp_tp, c.flashcomm2) == (0, 0, 0, 0, 0)
    assert c.sequence_parallel == "auto" and c.fuse_mm_reduce_scatter == "auto"
    assert c.inner == "inductor" and not c.release_weights and not c.strict
    assert c.module_tp_sizes() == {}


def test_from_dict_fields_and_vllm_ascend_keys():
    c = TPConfig.from_dict(
        {
            "oproj_tensor_parallel_size": 2,
            "lmhead_tensor_parallel_size": 4,
            "embedding_tensor_parallel_size": 8,
            "mlp_tensor_parallel_size": 2,
            "inner": "eager",
        }
    )
    assert (c.oproj_tp, c.lmhead_tp, c.embedding_tp, c.mlp_tp) == (2, 4, 8, 2)
    assert c.module_tp_sizes() == {"otp": 2, "lmheadtp": 4, "embedtp": 8, "mlptp": 2}
    fc2 = TPConfig.from_dict({"flashcomm2_oproj_tensor_parallel_size": 2})
    assert fc2.flashcomm2 == 2


def test_nested_finegrained_tp_config():
    c = TPConfig.from_dict(
        {"finegrained_tp_config": {"lmhead_tensor_parallel_size": 2}, "strict": True}
    )
    assert c.lmhead_tp == 2 and c.strict


def test_from_env_parses_strings():
    env = {
        "TP_PASSES_OPROJ_TP": "2",
        "TP_PASSES_SEQUENCE_PARALLEL": "0",
        "TP_PASSES_FUSE_MM_REDUCE_SCATTER": "auto",
        "TP_PASSES_DUMP": "1",
        "TP_PASSES_DUMP_DIR": "/tmp/x",
        "PATH": "/bin",
    }
    c = TPConfig.from_env(env)
    assert c.oproj_tp == 2 and c.sequence_parallel is False
    assert c.fuse_mm_reduce_scatter == "auto" and c.dump is True and c.dump_dir == "/tmp/x"


def test_resolve_options_over_env_over_defaults():
    env = {"TP_PASSES_OPROJ_TP": "2", "TP_PASSES_LMHEAD_TP": "4"}
    c = TPConfig.resolve({"oproj_tp": 8}, env)
    assert c.oproj_tp == 8 and c.lmhead_tp == 4 and c.mlp_tp == 0


@pytest.mark.parametrize(
    "d, key",
    [
        ({"oproj_tpp": 2}, "oproj_tpp"),
        ({"oproj_tp": "two"}, "oproj_tp"),
        ({"oproj_tp": 2.0}, "oproj_tp"),
        ({"oproj_tp": True}, "oproj_tp"),
        ({"lmhead_tp": -2}, "lmhead_tp"),
        ({"embedding_tensor_parallel_size": -1}, "embedding_tp"),
        ({"mlp_tp": -4}, "mlp_tp"),
        ({"flashcomm2": -1}, "flashcomm2"),
        ({"sequence_parallel": "maybe"}, "sequence_parallel"),
        ({"fuse_mm_reduce_scatter": 3}, "fuse_mm_reduce_scatter"),
        ({"inner": "tvm"}, "inner"),
        ({"release_weights": "sometimes"}, "release_weights"),
        ({"strict": 1}, "strict"),
        ({"finegrained_tp_config": 3}, "finegrained_tp_config"),
        ({"finegrained_tp_config": {"bogus_size": 1}}, "bogus_size"),
    ],
)
def test_invalid_values_name_the_key(d, key):
    with pytest.raises(ValueError, match=key):
        TPConfig.from_dict(d)


def test_flashcomm2_with_oproj_tp_rejected():
    with pytest.raises(ValueError, match="flashcomm2=2 and oproj_tp=2"):
        TPConfig(oproj_tp=2, flashcomm2=2)
    with pytest.raises(ValueError, match="flashcomm2"):
        TPConfig.from_dict(
            {"oproj_tensor_parallel_size": 2, "flashcomm2_oproj_tensor_parallel_size": 1}
        )


def test_unknown_env_var_named():
    with pytest.raises(ValueError, match="TP_PASSES_OPROJTP"):
        TPConfig.from_env({"TP_PASSES_OPROJTP": "2"})
    with pytest.raises(ValueError, match="TP_PASSES_MLP_TP"):
        TPConfig.from_env({"TP_PASSES_MLP_TP": "-1"})


def test_module_names_override_and_validation():
    c = TPConfig.from_dict({"module_names": {"oproj_tp": ["attn.c_proj"]}})
    assert c.names_for("oproj_tp", ("o_proj",)) == ("attn.c_proj",)
    assert c.names_for("lmhead_tp", ("lm_head",)) == ("lm_head",)
    env = TPConfig.from_env({"TP_PASSES_MODULE_NAMES": '{"lmhead_tp": ["head"]}'})
    assert env.names_for("lmhead_tp", ()) == ("head",)
    with pytest.raises(ValueError, match="module_names key 'qkv_tp'"):
        TPConfig.from_dict({"module_names": {"qkv_tp": ["x"]}})
    with pytest.raises(ValueError, match=r"module_names\['oproj_tp'\] must be a list"):
        TPConfig.from_dict({"module_names": {"oproj_tp": "o_proj"}})
    with pytest.raises(ValueError, match="TP_PASSES_MODULE_NAMES"):
        TPConfig.from_env({"TP_PASSES_MODULE_NAMES": "{not json"})


def test_selection_defaults_exclusions_and_overrides():
    from tp_passes.patterns.module_tp import selects

    c = TPConfig()
    assert selects(c, "oproj_tp", "model.layers.3.self_attn.o_proj")
    assert selects(c, "oproj_tp", "transformer.h.0.attention.dense")
    assert selects(c, "embedding_tp", "transformer.wte") and selects(c, "lmhead_tp", "lm_head")
    assert not selects(c, "oproj_tp", "model.layers.3.self_attn.q_proj")
    # draft (MTP) and vision modules only when asked
    assert not selects(c, "lmhead_tp", "model.mtp.0.lm_head")
    assert not selects(c, "oproj_tp", "visual.blocks.0.attn.o_proj")
    assert selects(TPConfig(include_draft_and_vision=True), "lmhead_tp", "model.mtp.0.lm_head")
    custom = TPConfig(module_names={"oproj_tp": ("c_proj",)})
    assert selects(custom, "oproj_tp", "h.1.attn.c_proj") and not selects(
        custom, "oproj_tp", "h.1.attn.o_proj"
    )


def test_shared_weights_config_from_env_and_dict():
    env = {"TP_PASSES_SHARED_WEIGHTS": "o_proj, down_proj", "TP_PASSES_PREFETCH_STEP": "2"}
    cfg = TPConfig.from_env(env)
    assert cfg.shared_weights == ("o_proj", "down_proj") and cfg.prefetch_step == 2
    assert TPConfig.from_dict({"shared_weights": '["o_proj"]'}).shared_weights == ("o_proj",)
    assert TPConfig(shared_weights=["o_proj"]).shared_weights == ("o_proj",)
    assert TPConfig().shared_weights_group == "stage"
    with pytest.raises(ValueError, match="prefetch_step must be >= 0, got -1"):
        TPConfig(prefetch_step=-1)
    with pytest.raises(ValueError, match="shared_weights_group must be one of stage, dp, tp"):
        TPConfig(shared_weights_group="world")
    with pytest.raises(ValueError, match="shared_weights must be a list of module names"):
        TPConfig(shared_weights="o_proj")
