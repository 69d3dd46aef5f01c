"""Singular values of the learned update scaling * B @ A, energy share and effective rank."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import deltatune
from deltatune import cli
from deltatune.analysis import effective_rank, energy_share, spectrum
from deltatune.analysis.adapter import LoraFactors
from deltatune.analysis.spectrum import update_svdvals
from tests.analysis.helpers import llama_adapter, saved
from tests.analysis.test_similarity import write_nan
from tests.conftest import make_model


@torch.no_grad()
def full_product_svdvals(model: deltatune.PeftModel) -> dict[str, torch.Tensor]:
    """The reference: svdvals of the (out, in) update, built from the live layers and their own scaling."""
    result = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight.double(), module.lora_B["default"].weight.double()
            result[name.removeprefix("base_model.model.")] = torch.linalg.svdvals(module.scaling["default"] * b @ a)
    return result


@pytest.mark.parametrize("settings", [
    {},
    {"use_rslora": True},
    {"r": 3, "lora_alpha": 5, "rank_pattern": {"v_proj": 6}, "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 2}},
], ids=["alpha_over_r", "rslora", "patterns"])
def test_spectrum_is_the_svd_of_the_full_product(tmp_path, settings):
    model = llama_adapter(**settings)
    expected = full_product_svdvals(model)
    for source in (model, saved(model, tmp_path)):
        spectra = spectrum(source)
        assert spectra.keys() == expected.keys() and len(spectra) == 4
        for name, s in spectra.items():
            assert s.dtype == torch.float64 and bool((s[:-1] >= s[1:]).all())
            torch.testing.assert_close(s, expected[name][: len(s)], rtol=1e-10, atol=1e-12)
            assert float(expected[name][len(s):].abs().max()) < 1e-10  # the rest of the product is 0


@pytest.mark.parametrize(("r", "d_in", "d_out"), [(5, 7, 40), (5, 3, 40), (6, 30, 2)])
def test_update_svdvals_when_r_is_near_or_above_a_dimension(r, d_in, d_out):
    a, b = torch.randn(r, d_in, dtype=torch.float64), torch.randn(d_out, r, dtype=torch.float64)
    s = update_svdvals(LoraFactors(a, b, -0.5))
    assert len(s) == min(r, d_in, d_out)
    torch.testing.assert_close(s, torch.linalg.svdvals(-0.5 * b @ a)[: len(s)])


def test_energy_share_and_effective_rank():
    flat, single = torch.ones(4, dtype=torch.float64), torch.tensor([3.0, 0.0, 0.0, 0.0])
    assert energy_share(flat, 1) == pytest.approx(0.25) and energy_share(flat, 4) == pytest.approx(1.0)
    assert effective_rank(flat) == pytest.approx(4.0) and effective_rank(single) == pytest.approx(1.0)
    s = torch.tensor([3.0, 2.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s) == pytest.approx(math.exp(-float((p * p.log()).sum())))
    assert energy_share(s, 2) == pytest.approx(13 / 14)
    assert energy_share(torch.zeros(3), 1) == 0.0 and effective_rank(torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="k must be at least 1"):
        energy_share(s, 0)


def test_an_untrained_adapter_has_a_zero_spectrum():
    untrained = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(r=4))
    for s in spectrum(untrained).values():
        assert float(s.abs().max()) == 0.0


def test_bad_input_is_a_clear_error(tmp_path):
    ia3 = saved(deltatune.get_peft_model(make_model("llama"), deltatune.IA3Config()), tmp_path / "ia3")
    with pytest.raises(ValueError, match="only LoRA adapters"):
        spectrum(ia3)
    write_nan(saved(llama_adapter(), tmp_path / "nan"), "layers.0.self_attn.q_proj.lora_B")
    with pytest.raises(ValueError, match="LoRA B weight of model.layers.0.self_attn.q_proj holds NaN or Inf"):
        spectrum(tmp_path / "nan")
    with pytest.raises(ValueError, match="not a PeftModel"):
        spectrum(make_model("llama"))


def test_cli_writes_plot_csv_and_json(tmp_path, capsys):
    folder = saved(llama_adapter(r=4, lora_alpha=16), tmp_path / "a")
    out = tmp_path / "out"
    assert cli.main(["analyze", "spectrum", folder, "--out", str(out)]) == 0
    spectra = spectrum(folder)
    rows = list(csv.DictReader((out / "spectrum.csv").read_text(encoding="utf-8").splitlines()))
    assert [row["module"] for row in rows] == list(spectra)
    for row in rows:
        s = spectra[row["module"]]
        assert (int(row["r"]), float(row["scaling"])) == (4, 4.0)
        assert [float(row[f"sigma_{i}"]) for i in range(1, 5)] == pytest.approx(s.tolist())
        assert float(row["energy_top1"]) == pytest.approx(energy_share(s, 1))
        assert float(row["energy_top4"]) == pytest.approx(1.0)
        assert float(row["effective_rank"]) == pytest.approx(effective_rank(s))
    saved_json = json.loads((out / "spectrum.json").read_text())
    assert saved_json[0]["singular_values"] == pytest.approx(spectra[rows[0]["module"]].tolist())
    assert (out / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "spectrum.png") in capsys.readouterr().out
    assert cli.main(["analyze", "spectrum", str(tmp_path), "--out", str(out)]) == 2
    assert "deltatune analyze: error:" in capsys.readouterr().err


def test_effective_rank_lines_run_in_layer_order(tmp_path, monkeypatch):
    """Module names sort as text ("layers.10" before "layers.2"); the plot's lines must still go layer by layer."""
    import matplotlib.pyplot as plt

    from deltatune.analysis.report import plot_spectra

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    spectra = {f"model.layers.{i}.self_attn.q_proj": torch.tensor([3.0, 2.0, 1.0 / (i + 1)]) for i in (0, 10, 2, 1)}
    plot_spectra(spectra, str(tmp_path / "spectrum.png"))
    (line,) = kept[0].axes[1].lines
    assert list(line.get_xdata()) == [0, 1, 2, 10]
