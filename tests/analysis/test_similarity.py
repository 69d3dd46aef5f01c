"""Subspace similarity phi(i, j) of two LoRA adapters (Hu et al. 2021, section 7.2)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltatune
from deltatune import cli
from deltatune.analysis import chance_grid, phi_grid, subspace_similarity
from tests.analysis.helpers import llama_adapter, one_layer_adapter, saved
from tests.conftest import make_model

MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def phi_by_definition(u_a: torch.Tensor, u_b: torch.Tensor, i: int, j: int) -> float:
    return float(torch.linalg.matrix_norm(u_a[:, :i].T @ u_b[:, :j]) ** 2 / min(i, j))


def test_phi_grid_is_the_definition():
    u_a = torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))[0]
    u_b = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))[0]
    grid = phi_grid(u_a, u_b)
    assert grid.shape == (5, 3) and grid.dtype == torch.float64
    for i in range(1, 6):
        for j in range(1, 4):
            assert grid[i - 1, j - 1].item() == pytest.approx(phi_by_definition(u_a, u_b, i, j), abs=1e-12)


@pytest.mark.parametrize("matrix", ["A", "B"])
def test_an_adapter_against_itself_is_one_on_the_diagonal(tmp_path, matrix):
    folder = saved(llama_adapter(), tmp_path)
    grids = subspace_similarity(folder, folder, matrix=matrix)
    assert list(grids) == MODULES
    for grid in grids.values():
        assert grid.shape == (4, 4) and grid.dtype == torch.float64
        torch.testing.assert_close(grid.diagonal(), torch.ones(4, dtype=torch.float64))
        assert bool((grid <= 1 + 1e-9).all() and (grid >= 0).all())


def test_a_peft_model_and_its_folder_agree(tmp_path):
    model, other = llama_adapter(seed=3), llama_adapter(seed=5, r=6)
    folder = saved(model, tmp_path)
    from_model, from_folder = subspace_similarity(model, other), subspace_similarity(folder, other)
    assert from_model.keys() == from_folder.keys()
    for name in from_model:
        torch.testing.assert_close(from_model[name], from_folder[name])


def test_swapping_the_adapters_transposes_the_grid():
    a, b = llama_adapter(seed=3, r=4), llama_adapter(seed=5, r=6)
    ab, ba = subspace_similarity(a, b, matrix="B"), subspace_similarity(b, a, matrix="B")
    for name in MODULES:
        assert ab[name].shape == (4, 6)
        torch.testing.assert_close(ab[name], ba[name].T)


def test_independent_gaussian_adapters_are_near_chance():
    """E[phi(i, j)] = max(i, j) / d for independent random subspaces of R^d (d = 256, r = 8)."""
    seeds = range(10, 30)
    grids = [subspace_similarity(one_layer_adapter(seed), one_layer_adapter(seed + 100))["proj"] for seed in seeds]
    mean = torch.stack(grids).mean(0)
    expected = chance_grid(8, 8, 256)
    assert float((mean / expected).mean()) == pytest.approx(1.0, abs=0.1)
    torch.testing.assert_close(mean, expected, rtol=0.35, atol=0.0)
    assert float(mean.max()) < 0.06  # far from the 1 of shared directions


def test_module_pattern_selects_modules(tmp_path):
    folder = saved(llama_adapter(), tmp_path)
    assert list(subspace_similarity(folder, folder, module=r"layers\.1\..*q_proj")) == [MODULES[2]]


def write_nan(folder: str, key_part: str) -> str:
    path = f"{folder}/adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if key_part in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    return key


def test_bad_input_is_a_clear_error(tmp_path):
    a = saved(llama_adapter(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"proj has base shape \(in, out\) = \(256, 256\).*\(256, 128\)"):
        subspace_similarity(one_layer_adapter(1), one_layer_adapter(2, d_out=128))
    with pytest.raises(ValueError, match="no module in common"):
        subspace_similarity(a, llama_adapter(target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="'nothing' matches none"):
        subspace_similarity(a, a, module="nothing")
    with pytest.raises(ValueError, match="matrix must be 'A' or 'B'"):
        subspace_similarity(a, a, matrix="C")
    untrained = deltatune.get_peft_model(make_model("llama"), deltatune.LoraConfig(r=4))
    with pytest.raises(ValueError, match="B matrix is all zeros"):
        subspace_similarity(untrained, a, matrix="B")
    ia3 = deltatune.get_peft_model(make_model("llama"), deltatune.IA3Config())
    with pytest.raises(ValueError, match="IA3 adapter; .* only LoRA"):
        subspace_similarity(a, ia3)
    with pytest.raises(FileNotFoundError, match="not an adapter folder"):
        subspace_similarity(a, tmp_path)
    key = write_nan(saved(llama_adapter(), tmp_path / "nan"), "layers.1.self_attn.v_proj.lora_A")
    with pytest.raises(ValueError, match=r"LoRA A weight of model.layers.1.self_attn.v_proj holds NaN"):
        subspace_similarity(a, tmp_path / "nan")
    assert "lora_A" in key


def test_cli_writes_heatmaps_and_csv(tmp_path, capsys):
    a = saved(llama_adapter(seed=3), tmp_path / "a")
    b = saved(llama_adapter(seed=5, r=6), tmp_path / "b")
    out = tmp_path / "out"
    assert cli.main(["analyze", "similarity", a, b, "--module", "q_proj", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "similarity.csv").read_text(encoding="utf-8").splitlines()))
    grids = subspace_similarity(a, b, module="q_proj")
    assert [row["module"] for row in rows] == list(grids) == [MODULES[0], MODULES[2]]
    for row in rows:
        grid = grids[row["module"]]
        assert (int(row["r_a"]), int(row["r_b"]), int(row["d"])) == (4, 6, 32)
        assert float(row["phi_1_1"]) == pytest.approx(float(grid[0, 0]))
        assert float(row["grid_mean"]) == pytest.approx(float(grid.mean()))
        assert float(row["chance"]) == pytest.approx(float(chance_grid(4, 6, 32).mean()))
        png = out / f"similarity_{row['module']}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    phi = json.loads((out / "similarity.json").read_text())["phi"]
    torch.testing.assert_close(torch.tensor(phi[MODULES[0]], dtype=torch.float64), grids[MODULES[0]])
    assert str(out / "similarity.csv") in capsys.readouterr().out
    assert cli.main(["analyze", "similarity", a, b, "--module", "o_proj", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("deltatune analyze: error: --module 'o_proj' matches none")
