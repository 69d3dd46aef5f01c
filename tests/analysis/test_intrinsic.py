"""Intrinsic dimension: the Fastfood projection against a dense reference built from its own diagonals, the
reparametrised model (exact at theta_d = 0, only theta_d trains), memory independent of d, d90, and errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deltatune.analysis.intrinsic import (
    Fastfood,
    IntrinsicModel,
    IntrinsicTask,
    _sylvester,
    check_dims,
    find_d90,
    hadamard,
    intrinsic_dimension,
    parse_dims,
    subspace_lr,
    train_run,
)
from deltatune.analysis.intrinsic_tasks import IntrinsicSettings, read_sst2
from deltatune.cli import main
from tests.conftest import make_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def butterfly(x: torch.Tensor) -> torch.Tensor:
    """Textbook fast Walsh-Hadamard transform (log2 n butterfly passes), as an independent reference."""
    x, n, h = x.clone(), x.shape[-1], 1
    while h < n:
        x = x.view(*x.shape[:-1], n // (2 * h), 2, h)
        x = torch.stack((x[..., 0, :] + x[..., 1, :], x[..., 0, :] - x[..., 1, :]), dim=-2).flatten(-3)
        h *= 2
    return x


def dense_reference(op: Fastfood) -> torch.Tensor:
    """P written out from the stored diagonals: block b = H diag(s_b G_b) Pi_b H diag(B_b), cut to D x d."""
    h = _sylvester(op.n, torch.float64)
    blocks = []
    for b in range(op.blocks):
        pi = torch.zeros(op.n, op.n, dtype=torch.float64)
        pi[torch.arange(op.n), op.perm[b].long()] = 1  # (Pi v)_k = v[perm_k]
        blocks.append(h @ torch.diag(op.gauss[b].double()) @ pi @ h @ torch.diag(op.signs[b].double()))
    return torch.cat(blocks)[:op.D, :op.d]


def columns(op: Fastfood) -> torch.Tensor:
    """P built column by column from the operator: P e_j."""
    return torch.stack([op.matvec(e) for e in torch.eye(op.d, dtype=torch.float64)], dim=1)


@pytest.mark.parametrize("n", [1, 2, 16, 128, 512, 1 << 15])
def test_hadamard_matches_butterfly_and_sylvester(n):
    x = torch.randn(2, n, dtype=torch.float64)
    assert torch.allclose(hadamard(x), butterfly(x))
    if n <= 512:
        assert torch.allclose(hadamard(x), x @ _sylvester(n, torch.float64))
    assert torch.allclose(hadamard(hadamard(x)), n * x)  # H H = n I


@pytest.mark.parametrize(("rows", "d"), [(256, 16), (300, 20), (1000, 3)])
def test_fastfood_equals_dense_matrix(rows, d):
    op = Fastfood(rows, d, seed=1)
    dense = columns(op)
    assert dense.shape == (rows, d)
    assert torch.allclose(dense, dense_reference(op), atol=1e-6)  # float32 diagonals, float64 maths
    x, y = torch.randn(d, dtype=torch.float64), torch.randn(rows, dtype=torch.float64)
    assert torch.allclose(op.matvec(x), dense @ x)
    assert torch.allclose(op.rmatvec(y), dense.T @ y)
    assert torch.allclose(op.matvec(2 * x - 3 * x.flip(0)), 2 * op.matvec(x) - 3 * op.matvec(x.flip(0)))
    norms = dense.norm(dim=0)
    if rows % op.n == 0:  # no block cut short: every column exactly unit norm
        assert torch.allclose(norms, torch.ones(d, dtype=torch.float64))
    else:
        assert bool((norms <= 1 + 1e-9).all()) and bool((norms > 0.85).all())


def test_fastfood_is_seeded_and_its_backward_is_the_transpose():
    assert torch.equal(Fastfood(500, 30, seed=4).perm, Fastfood(500, 30, seed=4).perm)
    assert not torch.equal(Fastfood(500, 30, seed=4).gauss, Fastfood(500, 30, seed=5).gauss)
    op = Fastfood(200, 12, seed=2)
    theta = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (theta,))


def test_large_d_uses_int32_permutations_and_stays_adjoint():
    op = Fastfood(100_000, 40_000, seed=3)  # n = 2^16: indices past int16, a three-factor Hadamard
    assert op.n == 1 << 16 and op.perm.dtype == torch.int32
    assert torch.equal(op.perm[0].sort().values, torch.arange(op.n, dtype=torch.int32))
    x, y = torch.randn(40_000, dtype=torch.float64), torch.randn(100_000, dtype=torch.float64)
    px = op.matvec(x)
    assert torch.allclose(px @ y, x @ op.rmatvec(y))  # <P x, y> = <x, P^T y>
    # near-orthogonal unit columns keep lengths, less the rows cut from the last block (D of blocks * n remain)
    assert px.norm() / x.norm() == pytest.approx((100_000 / (op.blocks * op.n)) ** 0.5, abs=0.03)


def test_d_equal_to_the_parameter_count_spans_every_direction():
    op = Fastfood(48, 48, seed=0)  # n = 64, one block cut to 48 x 48
    assert int(torch.linalg.matrix_rank(columns(op))) == 48


def test_stored_state_does_not_grow_with_d():
    rows = 1 << 20
    small, large = Fastfood(rows, 10), Fastfood(rows, 10_000)
    assert small.stored_bytes == 10 * rows  # float32 sign, int16 permutation index, float32 diagonal per row
    assert set(small.signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(large.stored_bytes - small.stored_bytes) <= 0.02 * small.stored_bytes  # padding to n = 16384
    assert large.stored_bytes * 1000 < 10_000 * rows * 4  # a dense P would be 40 GB, 4000 times more


class Wide(nn.Module):
    """About 263k weights and a loss on ``x``: room to see memory that would scale with d x D."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(256, 512), nn.Linear(512, 256)

    def forward(self, x: torch.Tensor) -> object:
        return type("Out", (), {"loss": (self.b(torch.relu(self.a(x))) - x).pow(2).mean()})()


_PEAKS_SCRIPT = """
import json, torch
from deltatune.analysis.intrinsic import IntrinsicTask, train_run
from tests.analysis.test_intrinsic import Wide

torch.manual_seed(0)
model = Wide()
task = IntrinsicTask("wide", "none", [{"x": torch.randn(8, 256)}], lambda m: 0.0)
for d in (10, 10_000):  # first runs pay one-time costs (the allocator's pools, libraries' buffers)
    train_run(model, task, d, steps=1, lr=0.01)
peaks = {10: [], 10_000: []}
for d in (10_000, 10, 10_000, 10):  # twice each, in both orders: freed memory the allocator keeps
    peaks[d].append(train_run(model, task, d, steps=2, lr=0.01).peak_memory_bytes)
params = sum(p.numel() for p in model.parameters())
print(json.dumps({"peaks": {str(k): v for k, v in peaks.items()}, "params": params}))
"""


def test_peak_memory_of_training_does_not_grow_with_d():
    """In a fresh process: RSS sampled in this long-lived test process also moves with what earlier tests freed."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _PEAKS_SCRIPT], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peaks, num_params = result["peaks"], result["params"]
    # float32 theta, its gradient and the transforms' temporaries: tens of bytes per weight whatever d is;
    # a dense P at d = 10^4 would add 10^4 * 4 bytes per weight (10 GB here)
    assert max(peaks["10"] + peaks["10000"]) < 64 * num_params
    # d x D grew 1000 times; the peaks differ by at most a few floats per weight (the allocator reuses freed
    # memory, so a run's peak above its start is noisy by a few MB either way: compare each d's lower peak, which
    # a growth with d would raise as much as the higher one). Measured lower peaks here: 0-0.01 MB at d = 10 and
    # 3.3-8.9 MB at d = 10^4 over five fresh processes, so the bound is 48 floats per weight (12.6 MB); a dense
    # P at d = 10^4 would add 10 GB
    assert abs(min(peaks["10000"]) - min(peaks["10"])) < 48 * num_params


def test_zero_theta_gives_the_original_model_exactly():
    torch.manual_seed(0)
    model = make_model("llama")
    ids = torch.randint(0, 96, (2, 7))
    before = model(ids).logits
    for said in (False, True):
        wrapped = IntrinsicModel(model, 64, said=said)
        assert torch.equal(wrapped(ids).logits, before)
        with wrapped.written() as plain:
            assert torch.equal(plain(ids).logits, before)


def test_only_theta_d_and_the_said_scalars_train():
    model = make_model("bert")
    m = len(list(model.parameters()))
    wrapped = IntrinsicModel(model, 100, said=True)
    trainable = {name: p.numel() for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"theta_d": 100 - m, "lambdas": m}
    with torch.no_grad():
        wrapped.theta_d.normal_()
    ids = torch.randint(0, 96, (2, 5))
    wrapped(input_ids=ids, labels=torch.tensor([0, 2])).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert wrapped.theta_d.grad.abs().sum() > 0 and wrapped.lambdas.grad.abs().sum() > 0


def test_written_weights_are_theta0_plus_p_theta_and_are_put_back_bit_for_bit():
    model = make_model("gpt2")
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapped = IntrinsicModel(model, 40)
    with torch.no_grad():
        wrapped.theta_d.normal_()
    flat = wrapped.projection.matvec(wrapped.theta_d.detach())
    with wrapped.written() as plain:
        written = torch.cat([p.detach().flatten() for p in plain.parameters()])
    assert torch.allclose(written, torch.cat([v.flatten() for v in original.values()]) + flat, atol=1e-6)
    assert all(torch.equal(p, original[name]) for name, p in model.named_parameters())


def classification_task(model: nn.Module) -> IntrinsicTask:
    torch.manual_seed(1)
    batch = {"input_ids": torch.randint(0, 96, (16, 6)), "labels": torch.randint(0, 3, (16,))}

    @torch.no_grad()
    def accuracy(scored: nn.Module) -> float:
        return float((scored(input_ids=batch["input_ids"]).logits.argmax(-1) == batch["labels"]).float().mean())

    return IntrinsicTask("toy", "accuracy", [batch], accuracy)


def test_training_in_a_subspace_lowers_the_loss_and_full_fine_tuning_puts_weights_back():
    torch.manual_seed(0)
    model = make_model("bert")
    task = classification_task(model)
    start = model(**task.batches[0]).loss.item()
    run = train_run(model, task, 200, steps=25, lr=0.05)
    assert run.final_loss < 0.7 * start and run.trainable == 200
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    full = train_run(model, task, None, steps=15, lr=1e-2)
    assert full.final_loss < 0.5 * start and full.metric >= 0.9
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_d90_is_the_smallest_d_reaching_90_percent():
    assert find_d90({10: 0.5, 100: 0.8, 1000: 0.95, 10_000: 0.99}, full=1.0) == 1000
    assert find_d90({10: 0.5, 100: 0.9, 1000: 0.85}, full=1.0) == 100  # not monotone: still the smallest
    assert find_d90({10: 0.2, 100: 0.7}, full=0.9) is None  # 0.81 needed
    assert find_d90({10: 0.2}, full=0.0) is None
    assert find_d90({5: 0.6}, full=0.8, fraction=0.5) == 5


def test_intrinsic_dimension_reports_d90_against_full_fine_tuning():
    torch.manual_seed(0)
    model = make_model("bert")
    result = intrinsic_dimension(model, classification_task(model), [2, 400], steps=12, lr=0.05, full_lr=1e-2,
                                 say=lambda _: None)
    metrics = {r.d: r.metric for r in result.runs}
    assert result.full is not None and result.threshold == pytest.approx(0.9 * result.full.metric)
    assert result.d90 == find_d90(metrics, result.full.metric)
    assert ("d90 = " in result.note) == (result.d90 is not None)


def test_a_diverged_d_is_recorded_and_the_sweep_goes_on():
    torch.manual_seed(0)
    model = Wide()
    task = IntrinsicTask("wide", "score", [{"x": torch.full((2, 256), float("nan"))}], lambda m: 1.0)
    result = intrinsic_dimension(model, task, [10, 20], steps=1, lr=0.1, full_lr=0.1, full_metric=2.0,
                                 say=lambda _: None)
    assert result.full is None and result.threshold == pytest.approx(1.8)
    assert [r.d for r in result.runs] == [10, 20] and all(r.metric != r.metric for r in result.runs)  # NaN
    assert result.d90 is None and "no d in [10, 20] reached 90%" in result.note


def test_subspace_learning_rate_keeps_the_step_in_weight_space():
    assert subspace_lr(0.3, 1000) == pytest.approx(0.3)
    assert subspace_lr(0.3, 10_000) * 100 == pytest.approx(subspace_lr(0.3, 100) * 10)  # lr_d * sqrt(d) fixed


def test_bad_dims_are_refused_with_what_does_not_match():
    with pytest.raises(ValueError, match="d=5000 is larger than the model's number of parameters D=4000"):
        check_dims([10, 5000], 4000)
    with pytest.raises(ValueError, match="d must be a positive integer, got 0"):
        check_dims([0], 4000)
    with pytest.raises(ValueError, match="m=7 per-tensor scalars"):
        check_dims([7], 4000, m=7)
    with pytest.raises(ValueError, match="'1e3' is not an integer"):
        parse_dims("10,1e3")
    with pytest.raises(ValueError, match="got -4"):
        parse_dims("10,-4")
    assert parse_dims("1000, 10,100,10") == [10, 100, 1000]
    with pytest.raises(ValueError, match="larger than the model's number of parameters"):
        IntrinsicModel(nn.Linear(3, 2), 9)
    with pytest.raises(ValueError, match="--task must be one of"):
        IntrinsicSettings([10], task="mnli").resolved()


def test_sst2_rows_and_their_errors(tmp_path):
    good = tmp_path / "good.tsv"
    good.write_text("text\tlabel\nfine film \t1\ndull \t0\n")
    assert read_sst2(str(good)) == [("fine film", 1), ("dull", 0)]
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nfine film\t7\n")
    with pytest.raises(ValueError, match="line 2: expected text<TAB>label with label 0 or 1"):
        read_sst2(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sst2(str(tmp_path / "missing.tsv"))


def tiny_classifier_folder(tmp_path) -> str:
    """A tiny BERT with a word-level tokenizer saved as an HF folder, and an SST-2 folder of 24 rows."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "fine", "great", "bad", "dull", "awful", "film", "a"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path / "model"
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=24, num_labels=2)).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    data = tmp_path / "sst2"
    data.mkdir()
    rows = [f"a {w} film\t{int(w in words[:3])}" for w in words[:6]] * 4
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    return str(folder)


def test_cli_writes_plot_csv_and_json_with_d90(tmp_path, capsys):
    model = tiny_classifier_folder(tmp_path)
    out = tmp_path / "out"
    code = main(["analyze", "intrinsic", "--dims", "4,64", "--model", model, "--data", str(tmp_path / "sst2"),
                 "--steps", "2", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "intrinsic.json").read_text())
    assert [run["d"] for run in report["runs"]] == [4, 64] and report["full"]["d"] is None
    assert "d90" in report and report["task"] == "sst2"
    assert (out / "intrinsic.png").stat().st_size > 0
    assert (out / "intrinsic.csv").read_text().splitlines()[0].startswith("d,accuracy,final_loss")


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    model = tiny_classifier_folder(tmp_path)
    data = str(tmp_path / "sst2")
    capsys.readouterr()  # saving the folder's progress bar
    cases = [(["--dims", "10,0", "--data", data], "d must be a positive integer, got 0"),
             (["--dims", "10", "--data", str(tmp_path / "nowhere")], "nowhere/train.tsv' does not exist"),
             (["--dims", "10,100000000", "--model", model, "--data", data],
              "d=100000000 is larger than the model's number of parameters D=")]
    for flags, message in cases:
        assert main(["analyze", "intrinsic", *flags, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()  # after transformers' loading progress bar, if any
        assert message in err.splitlines()[-1] and err.splitlines()[-1].startswith("deltatune analyze: error: ")
        assert "Traceback" not in err
