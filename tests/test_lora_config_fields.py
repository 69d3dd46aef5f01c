"""Every field of PEFT's LoraConfig is a keyword of deltatune's: at PEFT's default always, and a non-default value
either works or is refused with a "not supported yet" error naming the field. Configs move between the libraries as
files, and ``PeftConfig.from_pretrained`` reads them as PEFT's does.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
from peft.tuners.lora import config as peft_lora_config

import deltatune as dt
from deltatune.config import PeftConfig
from tests.conftest import quiet

PEFT_FIELDS = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}

WORKS, IGNORED, UNSUPPORTED = "works", "ignored", "unsupported"
# field -> (a non-default value, extra kwargs it needs, what deltatune does with it). IGNORED: PEFT ignores the
# value too (it only matters for an init mode that is not chosen), with a warning.
NON_DEFAULT = {
    "task_type": ("SEQ_CLS", {}, WORKS),
    "peft_type": ("LORA", {}, WORKS),
    "auto_mapping": ({"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"}, {}, WORKS),
    "peft_version": ("0.21.2", {}, WORKS),
    "base_model_name_or_path": ("org/model", {}, WORKS),
    "revision": ("v1", {}, WORKS),
    "inference_mode": (True, {}, WORKS),
    "r": (4, {}, WORKS),
    "target_modules": (["q_proj", "v_proj"], {}, WORKS),
    "exclude_modules": (["k_proj"], {}, WORKS),
    "lora_alpha": (16, {}, WORKS),
    "lora_dropout": (0.1, {}, WORKS),
    "fan_in_fan_out": (True, {}, WORKS),
    "bias": ("lora_only", {}, WORKS),
    "use_rslora": (True, {}, WORKS),
    "modules_to_save": (["lm_head"], {}, WORKS),
    "init_lora_weights": ("gaussian", {}, WORKS),
    "layers_to_transform": ([0], {}, WORKS),
    "layers_pattern": ("layers", {"layers_to_transform": [1]}, WORKS),
    "rank_pattern": ({"q_proj": 2}, {}, WORKS),
    "alpha_pattern": ({"v_proj": 4}, {}, WORKS),
    "megatron_core": ("megatron.core.custom", {}, WORKS),
    "qalora_group_size": (32, {}, WORKS),
    "use_dora": (True, {}, WORKS),
    "loftq_config": ({"loftq_bits": 4, "loftq_iter": 1}, {}, IGNORED),
    "eva_config": (peft_lora_config.EvaConfig(), {}, IGNORED),
    "corda_config": (peft_lora_config.CordaConfig(), {}, IGNORED),
    "lora_ga_config": (peft_lora_config.LoraGAConfig(), {}, IGNORED),
    "megatron_config": ({"tensor_model_parallel_size": 2}, {}, UNSUPPORTED),
    "trainable_token_indices": ([1, 2], {}, UNSUPPORTED),
    "velora_config": (peft_lora_config.VeloraConfig(), {}, UNSUPPORTED),
    "alora_invocation_tokens": ([5, 6], {}, UNSUPPORTED),
    "use_qalora": (True, {}, UNSUPPORTED),
    "monteclora_config": (peft_lora_config.MontecloraConfig(), {}, UNSUPPORTED),
    "layer_replication": ([(0, 1), (0, 2)], {}, UNSUPPORTED),
    "runtime_config": (peft_lora_config.LoraRuntimeConfig(ephemeral_gpu_offload=True), {}, UNSUPPORTED),
    "lora_bias": (True, {}, UNSUPPORTED),
    "target_parameters": (["experts.gate_up_proj"], {}, UNSUPPORTED),
    "use_bdlora": (peft_lora_config.BdLoraConfig(target_modules_bd_a=["q_proj"]), {}, UNSUPPORTED),
    "arrow_config": (peft_lora_config.ArrowConfig(), {}, UNSUPPORTED),
    "kasa_config": (peft_lora_config.KasaConfig(), {}, UNSUPPORTED),
    "ensure_weight_tying": (True, {}, UNSUPPORTED),
}


def _peft_default(name: str):
    f = PEFT_FIELDS[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _plain(value):
    """A config value as JSON would hold it (PEFT keeps target_modules as a set)."""
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def test_table_covers_every_peft_field():
    assert set(NON_DEFAULT) == set(PEFT_FIELDS), "a PEFT LoraConfig field is missing from the table (or gone)"


@pytest.mark.parametrize("name", sorted(PEFT_FIELDS))
def test_every_peft_field_is_accepted_at_peft_default(name):
    value = _peft_default(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a default must not even warn
        config = dt.LoraConfig(**{name: value})
    if name not in ("peft_type", "runtime_config"):  # LoraConfig sets peft_type; runtime_config becomes ours
        assert _plain(getattr(config, name)) == _plain(value)
    assert config.runtime_config.ephemeral_gpu_offload is False


def test_scripts_passing_peft_defaults_explicitly_work():
    """What TRL's and many scripts' LoraConfig(...) calls pass."""
    config = dt.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", use_dora=False,
                           lora_bias=False, ensure_weight_tying=False, use_rslora=False, init_lora_weights=True,
                           layer_replication=None, use_qalora=False, qalora_group_size=16, task_type="CAUSAL_LM",
                           modules_to_save=None, layers_to_transform=None, layers_pattern=None)
    assert config.r == 16 and config.lora_alpha == 32 and config.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("name", [n for n, (_, _, kind) in NON_DEFAULT.items() if kind == WORKS])
def test_supported_non_default_reaches_peft_through_the_file(name, tmp_path):
    value, extra, _ = NON_DEFAULT[name]
    config = dt.LoraConfig(**{name: value}, **extra)
    assert _plain(getattr(config, name)) == _plain(value)
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert _plain(getattr(theirs, name)) == _plain(value)
    assert _plain(getattr(dt.LoraConfig.from_pretrained(tmp_path), name)) == _plain(value)


@pytest.mark.parametrize("name", [n for n, (_, _, kind) in NON_DEFAULT.items() if kind == IGNORED])
def test_init_settings_without_their_init_mode_are_ignored_with_a_warning_as_in_peft(name, tmp_path):
    value, extra, _ = NON_DEFAULT[name]
    with pytest.warns(UserWarning, match=f"{name} is set but ignored"):
        config = dt.LoraConfig(**{name: value}, **extra)
    assert getattr(config, name) == _peft_default(name)
    config.save_pretrained(tmp_path)
    assert name not in json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("name", [n for n, (_, _, kind) in NON_DEFAULT.items() if kind == UNSUPPORTED])
def test_unsupported_feature_is_refused_naming_field_and_value(name):
    value, extra, _ = NON_DEFAULT[name]
    with pytest.raises(ValueError, match=rf"^{name}=.+ is not supported yet by deltatune") as info:
        dt.LoraConfig(**{name: value}, **extra)
    assert repr(value)[:20] in str(info.value)


@pytest.mark.parametrize("mode", ["eva", "corda", "lora_ga", "mica"])
def test_peft_only_init_modes_are_refused_clearly(mode):
    with pytest.raises(ValueError, match=rf"init_lora_weights='{mode}' is not supported yet by deltatune"):
        dt.LoraConfig(init_lora_weights=mode)


@pytest.mark.parametrize("mode", ["kaiming", 1, None])
def test_unknown_init_mode_is_invalid(mode):
    with pytest.raises(ValueError, match="is not a valid value"):
        dt.LoraConfig(init_lora_weights=mode)


def test_regex_targets_refuse_layers_pattern_as_peft_does():
    with pytest.raises(ValueError, match="layers_pattern"):
        peft.LoraConfig(target_modules=".*q_proj", layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_pattern"):
        dt.LoraConfig(target_modules=".*q_proj", layers_pattern="layers")


# ---- files in both directions ----------------------------------------------------------------------------------------


def test_deltatune_defaults_load_in_peft_as_peft_defaults(tmp_path):
    dt.LoraConfig().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = peft.LoraConfig.from_pretrained(tmp_path)
    reference = peft.LoraConfig()
    for name in PEFT_FIELDS:
        assert getattr(theirs, name) == getattr(reference, name), name


def test_peft_defaults_load_in_deltatune_as_deltatune_defaults(tmp_path):
    peft.LoraConfig().save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key PEFT writes is known
        ours = dt.LoraConfig.from_pretrained(tmp_path)
    reference = dt.LoraConfig()
    for f in dataclasses.fields(dt.LoraConfig):
        expected = peft.__version__ if f.name == "peft_version" else getattr(reference, f.name)
        assert getattr(ours, f.name) == expected, f.name


def test_peft_file_that_switches_on_a_feature_is_refused_naming_file_and_field(tmp_path):
    peft.LoraConfig(use_qalora=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config\.json: use_qalora=True .*not supported yet"):
        PeftConfig.from_pretrained(tmp_path)


def test_peft_file_with_eva_init_loads_as_plain_lora(tmp_path):
    """EVA only chose the starting A and B, which the file's weights replace."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.LoraConfig(init_lora_weights="eva", r=4).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["eva_config"] is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dt.LoraConfig.from_pretrained(tmp_path)
    assert ours.init_lora_weights is True and ours.eva_config is None and ours.r == 4


def test_peft_file_with_corda_init_is_refused(tmp_path):
    quiet(peft.LoraConfig(init_lora_weights="corda", corda_config=peft_lora_config.CordaConfig()).save_pretrained,
          tmp_path)
    with pytest.raises(ValueError, match="init_lora_weights='corda' is not supported yet"):
        dt.LoraConfig.from_pretrained(tmp_path)


def test_saved_config_leaves_out_peft_only_fields_at_default_but_keeps_set_ones(tmp_path):
    dt.LoraConfig(qalora_group_size=32).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "use_dora" not in written and "runtime_config" not in written and "peft_version" not in written
    assert written["qalora_group_size"] == 32 and written["peft_type"] == "LORA"


# ---- from_pretrained -------------------------------------------------------------------------------------------------


def test_peft_config_from_pretrained_returns_the_method_class(tmp_path):
    dt.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]).save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert type(config) is dt.LoraConfig
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 16, ["q_proj"])
    assert type(dt.PeftConfig.from_pretrained(str(tmp_path))) is dt.LoraConfig


def test_from_pretrained_honours_subfolder(tmp_path):
    dt.LoraConfig(r=2).save_pretrained(tmp_path / "other")
    assert dt.LoraConfig.from_pretrained(tmp_path, subfolder="other").r == 2
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        dt.LoraConfig.from_pretrained(tmp_path)  # the top folder holds no config


def test_from_pretrained_missing_folder_says_no_hub_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face Hub is not available offline"):
        PeftConfig.from_pretrained("some-org/some-adapter-that-is-not-here")
    with pytest.raises(FileNotFoundError, match="not available offline"):
        dt.LoraConfig.from_pretrained(tmp_path, subfolder="missing")


def test_from_pretrained_hub_options(tmp_path):
    dt.LoraConfig(r=2).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"\['cache_dir', 'token'\] only apply to downloads from the Hub"):
        assert dt.LoraConfig.from_pretrained(tmp_path, token="hf_x", cache_dir="/tmp/c").r == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unset hub options say nothing
        dt.LoraConfig.from_pretrained(tmp_path, token=None, local_files_only=False, revision="main")
    with pytest.raises(ValueError, match="revision='v2' needs the Hugging Face Hub"):
        dt.LoraConfig.from_pretrained(tmp_path, revision="v2")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['not_an_option'\\]"):
        dt.LoraConfig.from_pretrained(tmp_path, not_an_option=1)


def test_from_pretrained_config_kwargs_fill_in_missing_keys_and_the_file_wins(tmp_path):
    """PEFT's rule: class kwargs are defaults under the file's values, never overrides."""
    dt.LoraConfig(r=2).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["lora_alpha"]
    path.write_text(json.dumps(data))
    ours = dt.LoraConfig.from_pretrained(tmp_path, r=16, lora_alpha=32)
    theirs = peft.LoraConfig.from_pretrained(tmp_path, r=16, lora_alpha=32)
    assert (ours.r, ours.lora_alpha) == (theirs.r, theirs.lora_alpha) == (2, 32)


def test_from_pretrained_of_unknown_method_names_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "target_modules": ["k"]}))
    with pytest.raises(ValueError, match="peft_type='OFT' is not a method deltatune knows"):
        PeftConfig.from_pretrained(tmp_path)


def test_runtime_config_in_a_file_is_dropped_with_a_warning_as_peft_does(tmp_path):
    dt.LoraConfig(r=2).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "runtime_config": {"ephemeral_gpu_offload": True}}))
    with pytest.warns(UserWarning, match="runtime_config"):
        ours = dt.LoraConfig.from_pretrained(tmp_path)
    assert ours.runtime_config.ephemeral_gpu_offload is False and ours.r == 2
