import json

import pytest

from mmt import config
from mmt.config import ConfigError, TransformerConfig, VisionConfig, apply_overrides, from_dict, load, save, to_dict


@pytest.fixture(autouse=True)
def warnings_not_yet_given(monkeypatch):
    monkeypatch.setattr(config, "_warned", set())  # a removed key is warned about once per process


def test_round_trip_through_json(tmp_path):
    cfg = VisionConfig(stem="patch", conv_widths=(16, 32, 64), encoder=TransformerConfig(dim=128, depth=3))
    save(cfg, tmp_path / "v.json")
    assert load(VisionConfig, tmp_path / "v.json") == cfg


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(ConfigError, match=r"unknown config key encoder\.dimm"):
        from_dict(VisionConfig, {"encoder": {"dimm": 3}})


@pytest.mark.parametrize(
    "data, message",
    [
        ({"image_size": "big"}, r"image_size: expected an integer"),
        ({"image_size": 3.5}, r"image_size: expected an integer"),
        ({"stem": "resnet"}, r"stem: 'resnet' is not one of \['conv', 'patch'\]"),
        ({"encoder": {"norm_first": "yes"}}, r"encoder\.norm_first: expected true/false"),
        ({"conv_widths": [16, "x"]}, r"conv_widths\[1\]: expected an integer"),
        ({"encoder": 5}, r"encoder: expected a mapping"),
    ],
)
def test_ill_typed_values_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(VisionConfig, data)


def test_ints_are_accepted_for_floats():
    assert from_dict(TransformerConfig, {"dropout": 0}).dropout == 0.0


def test_overrides_apply_and_validate():
    cfg = apply_overrides(VisionConfig(), ["encoder.depth=4", "stem=patch", "conv_widths=[8,16]"])
    assert cfg.encoder.depth == 4 and cfg.stem == "patch" and cfg.conv_widths == (8, 16)
    with pytest.raises(ConfigError, match="unknown config key encoder.deepth"):
        apply_overrides(VisionConfig(), ["encoder.deepth=4"])
    with pytest.raises(ConfigError, match="unknown config key nope in override"):
        apply_overrides(VisionConfig(), ["nope.depth=4"])
    with pytest.raises(ConfigError, match="encoder.depth: expected an integer"):
        apply_overrides(VisionConfig(), ["encoder.depth=four"])
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides(VisionConfig(), ["encoder.depth"])


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**to_dict(VisionConfig()), "colour": 1}))
    with pytest.raises(ConfigError, match=r"bad\.json: unknown config key colour"):
        load(VisionConfig, path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid json"):
        load(VisionConfig, path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load(VisionConfig, tmp_path / "missing.json")


def test_fixed_length_tuples():
    from mmt.train import TrainConfig

    assert apply_overrides(TrainConfig(), ["betas=[0.9, 0.999]"]).betas == (0.9, 0.999)
    with pytest.raises(ConfigError, match="betas: expected 2 items, got 3"):
        apply_overrides(TrainConfig(), ["betas=[0.9, 0.99, 0.9]"])
    with pytest.raises(ConfigError, match=r"betas\[1\]: expected a number"):
        apply_overrides(TrainConfig(), ["betas=[0.9, \"x\"]"])


def test_keys_of_older_configs_are_dropped_warned_about_or_refused(caplog):
    # at their old default: dropped quietly; the kernel fields: ignored with a warning (a runtime
    # setting now); removed experiments switched on: refused, since the model cannot be built
    old = {"encoder": {"fast_attention": True, "fused_on_bf16_cpu": False}, "coord_channels": False, "conv_layout": "resnet"}
    assert from_dict(VisionConfig, old) == from_dict(VisionConfig, {"encoder": {}})
    caplog.set_level("WARNING", logger="mmt")
    assert from_dict(TransformerConfig, {"fused_on_bf16_cpu": True}) == TransformerConfig()
    assert "fused_on_bf16_cpu=True ignored: the attention kernel is a runtime setting" in caplog.text
    for key, value in (("coord_channels", True), ("conv_layout", "plain")):
        with pytest.raises(ConfigError, match=rf"{key}={value!r}: .*removed in mmt 0.2; this config cannot be built"):
            from_dict(VisionConfig, {key: value})
    with pytest.raises(ConfigError, match=r"positions: 'xy' is not one of"):
        from_dict(VisionConfig, {"positions": "xy"})


def test_a_key_an_older_config_lacks_takes_the_value_it_had_then():
    # mmt 0.1 stretched images to the model's square; a saved config without image_fit is one of
    # 0.1's, while a config made now (or written by hand, leaving keys out) crops
    assert from_dict(VisionConfig, {}, saved=True).image_fit == "stretch"
    assert from_dict(VisionConfig, {}).image_fit == "crop" and VisionConfig().image_fit == "crop"
    assert from_dict(VisionConfig, to_dict(VisionConfig()), saved=True).image_fit == "crop"
    assert apply_overrides(VisionConfig(), ["image_size=32"]).image_fit == "crop"


def old_run_config(fused_on_bf16_cpu):
    """A run config as mmt 0.1 wrote it for the VQA task: no train.attention, no generation
    section, no image_fit, and the kernel fields on each Transformer stack."""
    from mmt.tasks.vqa import VQARunConfig

    data = json.loads(json.dumps({"task": "vqa", **to_dict(VQARunConfig())}))
    del data["train"]["attention"], data["generation"], data["model"]["vision"]["image_fit"]
    stacks = []

    def walk(node):
        if isinstance(node, dict):
            if {"heads", "depth"} <= set(node):
                stacks.append(node)
            for value in node.values():
                walk(value)

    walk(data["model"])
    for stack, fused in zip(stacks, fused_on_bf16_cpu(len(stacks)), strict=True):
        stack.update(fast_attention=True, fused_on_bf16_cpu=fused)
    return data


def test_a_resumed_old_run_keeps_its_kernel_and_image_fit_and_the_tasks_defaults_for_the_rest(tmp_path, caplog):
    # mmt 0.1 chose the attention kernel in the model config: vqa-fast's stacks all asked for the
    # fused kernel, the other presets' for none (the "auto" rule); resuming keeps that choice
    from mmt.api import saved_run_config as _saved
    from mmt.tasks.vqa import VQARunConfig

    path = tmp_path / "run_config.json"
    fast = _saved(VQARunConfig, old_run_config(lambda n: [True] * n), path)
    assert fast.train.attention == "fused" and fast.model.vision.image_fit == "stretch"
    assert fast.generation == VQARunConfig().generation  # a section 0.1 did not write: the default
    assert _saved(VQARunConfig, old_run_config(lambda n: [False] * n), path).train.attention == "auto"
    caplog.set_level("WARNING", logger="mmt")
    mixed = _saved(VQARunConfig, old_run_config(lambda n: [True] + [False] * (n - 1)), path)
    assert mixed.train.attention == "auto" and "per Transformer stack" in caplog.text
    now = json.loads(json.dumps({"task": "vqa", **to_dict(VQARunConfig())}))
    now["train"]["attention"] = "literal"
    assert _saved(VQARunConfig, now, path).train.attention == "literal"  # a run of 0.2 says it itself
    data = old_run_config(lambda n: [True] * n)
    data["train"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"run_config\.json: train\.steps: expected an integer"):
        _saved(VQARunConfig, data, path)


def _numeric_fields_without_a_range():
    """(class.field) of every int or float setting (or tuple of them) of every task's run config,
    models included, that gives no `Range`."""
    import dataclasses
    import typing

    from mmt import registry
    from mmt.config import Range
    from mmt.tasks import task_class

    missing, seen = [], set()

    def numeric(tp):
        args = typing.get_args(tp)
        if typing.get_origin(tp) is typing.Annotated:
            return numeric(args[0])
        if typing.get_origin(tp) is tuple:
            return bool(args) and all(numeric(a) for a in args if a is not Ellipsis)
        return tp in (int, float)

    def has_range(tp):
        if any(isinstance(m, Range) for m in getattr(tp, "__metadata__", ())):
            return True
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return typing.get_origin(tp) is tuple and all(has_range(a) for a in args)

    def walk(cls):
        if cls in seen:
            return
        seen.add(cls)
        for name, tp in typing.get_type_hints(cls, include_extras=True).items():
            if name not in {f.name for f in dataclasses.fields(cls)}:
                continue
            plain = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
            if dataclasses.is_dataclass(plain):
                walk(plain)
            elif numeric(tp) and not has_range(tp):
                missing.append(f"{cls.__name__}.{name}")

    for task in ("vqa", "caption", "retrieval", "pretrain"):
        walk(task_class(task).run_config)
    for name in registry.preset_names():
        walk(type(registry.preset(name)))
    return sorted(missing)


def test_every_numeric_setting_gives_its_range():
    # token ids may be -1 ("never"), a length penalty may be negative: those are free
    assert _numeric_fields_without_a_range() == ["CaptionConfig.bos_id", "CaptionConfig.eos_id", "GenerationConfig.length_penalty"]


@pytest.mark.parametrize(
    "override",
    [
        "train.steps=0", "train.steps=-5", "train.batch_size=0", "train.batch_size=-1", "model.fusion_encoder.heads=0",
        "train.eval_every=0", "train.save_every=0", "train.log_every=0", "data.num_train=0", "train.keep_last=0",
        "train.grad_clip=-1", "train.lr=0", "train.betas=[0.9,1.0]", "model.vision.conv_widths=[64,0]",
        "generation.top_p=0", "model.fusion_encoder.dropout=1.5", "model.answer_max_len=1",
    ],
)
def test_a_setting_out_of_its_range_is_refused_with_its_key(override):
    from mmt.tasks.vqa import VQARunConfig

    key = override.split("=")[0].replace("[", r"\[")
    with pytest.raises(ConfigError, match=rf"^{key}(\[\d\])?: .* is out of range \(must be "):
        apply_overrides(VQARunConfig(), [override])


def test_ranges_hold_for_configs_made_in_python_and_from_files(tmp_path):
    from mmt.train import TrainConfig

    with pytest.raises(ConfigError, match=r"^steps: 0 is out of range \(must be >= 1\)"):
        TrainConfig(steps=0)
    path = tmp_path / "train.json"
    path.write_text('{"grad_clip": -1}')
    with pytest.raises(ConfigError, match=r"train\.json: grad_clip: -1\.0 is out of range"):
        config.load(TrainConfig, path)


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    from mmt.train import TrainConfig

    path = tmp_path / "latin1.json"
    path.write_bytes('{"steps": 5, "note": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.json: not UTF-8 text"):
        config.load(TrainConfig, path)
