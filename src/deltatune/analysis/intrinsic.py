"""Intrinsic dimension (Aghajanyan et al. 2020; Li et al. 2018): fine-tune in a random d-dimensional subspace.

Only a vector ``theta_d`` (d values) is trained; the model runs with ``theta = theta_0 + P theta_d``, where
``theta_0`` is the model's own frozen weights (all D of them, flattened in ``named_parameters`` order) and
``P`` is a D x d random projection. ``d90`` is the smallest d whose metric reaches 90% of full fine-tuning's.

P is the Fastfood transform (Le et al. 2013), as both papers use it: per block of n = 2^ceil(log2 d) rows,
``V = H G Pi H B`` with B random signs, Pi a random permutation, G a Gaussian diagonal and H the Walsh-Hadamard
matrix; ceil(D / n) blocks are stacked and cut to D rows. What is stored is the diagonals and permutations,
O(D) in all and the same for every d (10 bytes per model parameter); P is never a dense D x d matrix,
which for SmolLM2 at d = 10^4 would be 5 TB. P theta_d and its transpose are computed block-chunk by
block-chunk with fast Walsh-Hadamard transforms, in a ``torch.autograd.Function`` whose backward is the
transposed operator, so autograd saves nothing of size D x d either.

SAID (Aghajanyan et al., section 4) spends m of the d values on one scalar per parameter tensor:
``theta_i = theta_0,i + lambda_i * (P theta_{d-m})_i``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

CHUNK = 1 << 20  # rows of P computed at once: 4 MB of float32 per temporary, whatever d and D are
_FACTOR = 128  # Hadamard transforms as matmuls with Sylvester matrices of at most this size


@functools.lru_cache(maxsize=32)
def _sylvester(m: int, dtype: torch.dtype) -> torch.Tensor:
    """The m x m Walsh-Hadamard matrix (entries +-1, m a power of two), Sylvester's construction; cached
    (at most 128 x 128: 64 KB), since every chunk of every transform uses it."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < m:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last axis of ``x`` (length n, a power of two): ``x @ H_n``.

    ``H_n = H_a kron H_b`` (Sylvester), so the transform of a row viewed as an (a, b) matrix X is
    ``H_a X H_b``: two small matmuls (recursively more when n > 128^2) instead of log2(n) butterfly passes,
    which is faster in PyTorch on CPU. Plain differentiable torch ops; O(n * sum of factors) work per row.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}.")
    if n <= _FACTOR:
        return x @ _sylvester(n, x.dtype)
    b = min(_FACTOR, 1 << (n.bit_length() // 2))  # balanced factors: 1024 = 32 x 32 costs 64 MACs a value
    a = n // b
    rows = x.reshape(-1, a, b) @ _sylvester(b, x.dtype)  # X H_b, (rows, a, b)
    if a <= _FACTOR:
        rows = torch.matmul(_sylvester(a, x.dtype), rows)  # H_a X H_b
    else:
        rows = hadamard(rows.transpose(1, 2)).transpose(1, 2)  # H_a along the middle axis, recursively
    return rows.reshape(x.shape)


class Fastfood:
    """A D x d Fastfood projection P (Le et al. 2013), stored as O(D) diagonals, never as a matrix.

    Block b (rows b*n .. b*n+n-1) is ``H diag(s_b G_b) Pi_b H diag(B_b)``; the input is theta_d padded with
    zeros to n. ``s_b = 1 / (sqrt(n) * ||G_b|| * sqrt(blocks))`` makes every column of P exactly unit norm
    before the last block is cut to D rows (Li et al. 2018 normalise the same way), so a step of size
    ``eps`` in theta_d moves theta by ``eps`` whatever d and D are.

    Stored: B as float32 +-1 (a multiply is 3x faster than selecting by a bool mask), Pi as int16 (int32 when
    n > 2^15), s_b G_b as float32: 10 bytes a row. Changing d changes only n, so the stored bytes are the same
    up to padding to a whole block.

    Args:
        rows: D, the model's parameter count. d: columns (the trained dimension), 1 <= d <= D.
        seed: the projection is a pure function of (D, d, seed).
    """

    def __init__(self, rows: int, d: int, seed: int = 0) -> None:
        if d <= 0 or rows <= 0:
            raise ValueError(f"Fastfood needs positive dimensions, got D={rows}, d={d}.")
        if d > rows:
            raise ValueError(f"d={d} is larger than D={rows}: a projection to a space of more dimensions "
                             "than the model has parameters is not a subspace.")
        self.D, self.d, self.seed = rows, d, seed
        self.n = 1 << max(d - 1, 0).bit_length()  # n = 2^ceil(log2 d)
        self.blocks = math.ceil(rows / self.n)
        generator = torch.Generator().manual_seed(seed)
        shape = (self.blocks, self.n)
        self.signs = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1  # B
        gauss = torch.randn(shape, generator=generator)
        self.perm = torch.empty(shape, dtype=torch.int16 if self.n <= 1 << 15 else torch.int32)
        step = max(1, CHUNK // self.n)
        for start in range(0, self.blocks, step):  # a random permutation per block, CHUNK rows at a time
            keys = torch.rand(min(step, self.blocks - start), self.n, generator=generator)
            self.perm[start:start + step] = keys.argsort(dim=1).to(self.perm.dtype)
        norms = gauss.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.gauss = gauss / (math.sqrt(self.n) * norms * math.sqrt(self.blocks))  # s_b G_b

    @property
    def stored_bytes(self) -> int:
        """Bytes this projection keeps: its diagonals, permutations and block scales (no D x d matrix)."""
        return sum(t.numel() * t.element_size() for t in (self.signs, self.gauss, self.perm))

    def _chunks(self) -> Iterator[slice]:
        step = max(1, CHUNK // self.n)
        for start in range(0, self.blocks, step):
            yield slice(start, min(start + step, self.blocks))

    @torch.no_grad()
    def matvec(self, theta_d: torch.Tensor) -> torch.Tensor:
        """``P @ theta_d``: shape (d,) -> (D,), in theta_d's dtype."""
        if theta_d.shape != (self.d,):
            raise ValueError(f"theta_d has shape {tuple(theta_d.shape)}, this projection takes ({self.d},).")
        x = torch.zeros(self.n, dtype=theta_d.dtype)
        x[:self.d] = theta_d
        out = torch.empty(self.blocks, self.n, dtype=theta_d.dtype)
        for rows in self._chunks():
            y = hadamard(self.signs[rows].to(x.dtype) * x)  # H B x, (c, n)
            y = y.gather(1, self.perm[rows].long()) * self.gauss[rows].to(x.dtype)  # s G Pi (H B x)
            out[rows] = hadamard(y)
        return out.view(-1)[:self.D]

    @torch.no_grad()
    def rmatvec(self, g: torch.Tensor) -> torch.Tensor:
        """``P^T @ g``: shape (D,) -> (d,). Block b's transpose is ``B H Pi^T (s_b G) H`` (H is symmetric)."""
        if g.shape != (self.D,):
            raise ValueError(f"g has shape {tuple(g.shape)}, the transposed projection takes ({self.D},).")
        padded = torch.empty(self.blocks * self.n, dtype=g.dtype)
        padded[:self.D] = g
        padded[self.D:] = 0  # only the rows cut from the last block
        padded = padded.view(self.blocks, self.n)
        total = torch.zeros(self.n, dtype=g.dtype)
        for rows in self._chunks():
            y = hadamard(padded[rows]) * self.gauss[rows].to(g.dtype)
            y = hadamard(torch.empty_like(y).scatter_(1, self.perm[rows].long(), y))  # H Pi^T
            total += (y * self.signs[rows].to(g.dtype)).sum(0)
        return total[:self.d]

    def __call__(self, theta_d: torch.Tensor) -> torch.Tensor:
        """``P @ theta_d`` with autograd: the gradient w.r.t. theta_d is ``P^T @ grad``."""
        return _Project.apply(theta_d, self)


class _Project(torch.autograd.Function):
    """P theta_d whose backward applies P^T: saves nothing but a reference to the operator."""

    @staticmethod
    def forward(ctx: Any, theta_d: torch.Tensor, op: Fastfood) -> torch.Tensor:
        ctx.op = op
        return op.matvec(theta_d)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.op.rmatvec(grad.contiguous()), None


def parameter_count(model: nn.Module) -> int:
    """D: the model's parameters, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in model.parameters())


class IntrinsicModel(nn.Module):
    """Runs ``model`` with ``theta_0 + P theta_d`` (or, with ``said``, ``theta_0,i + lambda_i (P theta)_i``).

    ``theta_0`` stays the model's own frozen parameters (not copied); ``theta_d`` (zeros) and, with
    ``said``, ``lambda`` (ones, one per parameter tensor) are the only trainable values. Ones, not zeros:
    with lambda = 0 and theta_d = 0 both gradients would be zero and training could not start.

    Args:
        model: any ``nn.Module``; its tied parameters are one tensor of theta (``functional_call`` keeps
            them tied).
        d: trained dimension, including the m lambdas when ``said``.
        said: structure-aware scaling (Aghajanyan et al. 2020, section 4).

    Raises:
        ValueError: d <= 0, d larger than the model's parameter count D, or (said) d <= m.
    """

    def __init__(self, model: nn.Module, d: int, said: bool = False, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        params = list(model.parameters())
        num_params, m = sum(p.numel() for p in params), len(params) if said else 0
        check_dims([d], num_params, m)
        for p in params:
            p.requires_grad_(False)
        self.projection = Fastfood(num_params, d - m, seed)
        self.theta_d = nn.Parameter(torch.zeros(d - m))
        self.lambdas = nn.Parameter(torch.ones(m)) if said else None

    def deltas(self) -> dict[str, torch.Tensor]:
        """Each parameter tensor's change ``(lambda_i *) (P theta_d)_i``, shaped like the tensor."""
        named = list(self.model.named_parameters())
        # split, not a slice per tensor: each slice's backward would build a zero tensor of all D values
        pieces = self.projection(self.theta_d).split([p.numel() for _, p in named])
        out = {}
        for i, ((name, p), piece) in enumerate(zip(named, pieces, strict=True)):
            delta = piece.view(p.shape).to(p.dtype)
            out[name] = delta * self.lambdas[i] if self.lambdas is not None else delta
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        deltas = self.deltas()
        params = {name: p + deltas[name] for name, p in self.model.named_parameters()}
        return functional_call(self.model, params, args, kwargs)

    @contextlib.contextmanager
    def written(self) -> Iterator[nn.Module]:
        """The plain model with ``theta_0 + P theta_d`` written into its weights (for ``generate`` & co);
        the original tensors are put back afterwards, bit for bit."""
        originals = {}
        with torch.no_grad():
            deltas = self.deltas()
            for name, p in self.model.named_parameters():
                originals[name] = p.data
                p.data = p.data + deltas[name]
        try:
            yield self.model
        finally:
            for name, p in self.model.named_parameters():
                p.data = originals[name]


def check_dims(dims: list[int], num_params: int, m: int = 0) -> None:
    """Refuse dims that cannot be trained, before any training starts.

    Raises:
        ValueError: a d <= 0, a d larger than D (the model's parameter count), or, with SAID's m per-tensor
            scalars, a d <= m; the message names the d and the number it does not fit.
    """
    for d in dims:
        if d <= 0:
            raise ValueError(f"--dims: d must be a positive integer, got {d}.")
        if d > num_params:
            raise ValueError(f"--dims: d={d} is larger than the model's number of parameters D={num_params}; "
                             f"a d-dimensional subspace of the weights needs d <= D.")
        if m and d <= m:
            raise ValueError(f"--dims: d={d} leaves no room for the m={m} per-tensor scalars of --said "
                             f"(one per parameter tensor); give d > {m}.")


def parse_dims(text: str) -> list[int]:
    """``"10,100,1000"`` -> ``[10, 100, 1000]`` (sorted, duplicates dropped; ``1_000`` is allowed).

    Raises:
        ValueError: an entry that is not an integer or not positive, or no entry at all.
    """
    dims = set()
    for part in text.split(","):
        try:
            dims.add(int(part.strip()))
        except ValueError:
            raise ValueError(f"--dims: {part.strip()!r} is not an integer; give e.g. --dims 10,100,1000.") from None
    if not dims:
        raise ValueError("--dims: give at least one dimension, e.g. --dims 10,100,1000.")
    check_dims(sorted(dims), max(dims))  # d <= 0 now; d > D once the model is known
    return sorted(dims)


def find_d90(metrics: dict[int, float], full: float, fraction: float = 0.9) -> int | None:
    """d90 (Aghajanyan et al. 2020, section 3): the smallest d whose metric is at least ``fraction * full``.

    Returns:
        That d, or None when no d reaches it, or when ``full <= 0`` (90% of nothing is no bar).
    """
    if full <= 0:
        return None
    reached = [d for d, value in metrics.items() if value >= fraction * full]
    return min(reached) if reached else None


@dataclass
class IntrinsicTask:
    """What every run trains on and is scored by.

    Attributes:
        batches: inputs of ``model(**batch)``, whose output has ``.loss``; run ``steps`` of them, cycling.
        evaluate: the metric (higher is better) of a plain model holding the weights to score.
    """

    name: str
    metric: str
    batches: list[dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module], float]


@dataclass
class RunResult:
    """One training run: ``d`` None is full fine-tuning."""

    d: int | None
    metric: float
    final_loss: float  # mean training loss of the last 5 steps
    seconds_per_step: float
    peak_memory_bytes: int  # peak resident memory during training, above the resident memory before it
    stored_bytes: int  # what the projection keeps (0 for full fine-tuning)
    trainable: int


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc, else psutil)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak resident memory above the level at ``__enter__``, sampled every ``interval`` s in a thread.

    Resident memory, not tracemalloc: PyTorch's CPU tensors are not allocated through Python's allocator,
    so tracemalloc would not see them.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def peak_bytes(self) -> int:
        return self.peak - self.start


class NonFiniteLossError(ValueError):
    """The training loss became NaN or Inf."""


def subspace_lr(lr: float, d: int) -> float:
    """The learning rate of theta_d at d: ``lr * sqrt(1000 / d)``.

    With unit-norm columns of P and Adam's roughly sign-sized steps, one step moves theta by about
    ``lr_d * sqrt(d)``; scaling by 1/sqrt(d) keeps that step the same for every d, so each d gets the same
    budget of movement in weight space. (Tuned on all-MiniLM-L6-v2 / SST-2, 40 steps: the best rate was
    0.3 at d = 1000 and 0.1 at d = 10^4, matching this rule.)
    """
    return lr * math.sqrt(1000 / d)


def train_run(model: nn.Module, task: IntrinsicTask, d: int | None, steps: int, lr: float, said: bool = False,
              seed: int = 0) -> RunResult:
    """Train ``theta_d`` (or, with ``d`` None, every weight: full fine-tuning) with AdamW, then score it.

    The model's own weights are the same afterwards: a d run never writes them, and full fine-tuning works
    on them and then puts back a copy (O(D) memory).

    Raises:
        ValueError: bad d (see :func:`check_dims`); NonFiniteLossError (a ValueError): the loss became NaN/Inf.
    """
    torch.manual_seed(seed)
    snapshot = None
    if d is None:
        snapshot = {name: p.detach().clone() for name, p in model.named_parameters()}
        trained: nn.Module = model
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        trained = IntrinsicModel(model, d, said, seed)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    trained.train()
    with PeakMemory() as memory:
        start = time.perf_counter()
        for step in range(steps):
            loss = trained(**task.batches[step % len(task.batches)]).loss
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"d={d or 'full'}: the training loss became {loss.item()} at step {step + 1}; "
                                 "lower the learning rate.")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        seconds = (time.perf_counter() - start) / max(steps, 1)
    trained.eval()
    try:
        if isinstance(trained, IntrinsicModel):
            with trained.written() as scored:
                metric = task.evaluate(scored)
        else:
            metric = task.evaluate(model)
    finally:
        if snapshot is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(snapshot[name])
                    p.requires_grad_(False)
    tail = losses[-5:]
    return RunResult(d, float(metric), sum(tail) / max(len(tail), 1), seconds, memory.peak_bytes,
                     trained.projection.stored_bytes if isinstance(trained, IntrinsicModel) else 0,
                     sum(p.numel() for p in params))


@dataclass
class IntrinsicResult:
    """The sweep: baseline (no training), full fine-tuning, one run per d, and d90."""

    task: str
    metric: str
    D: int
    said: bool
    steps: int
    baseline: float
    full: RunResult | None
    runs: list[RunResult] = field(default_factory=list)
    d90: int | None = None
    threshold: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def intrinsic_dimension(model: nn.Module, task: IntrinsicTask, dims: list[int], steps: int, lr: float,
                        full_lr: float, said: bool = False, seed: int = 0, full_metric: float | None = None,
                        say: Callable[[str], None] = print) -> IntrinsicResult:
    """Train at each d in ``dims`` and fully, and find d90 (Aghajanyan et al. 2020).

    Args:
        dims: trained dimensions; all are checked against D before anything trains.
        steps: optimizer steps of every run.
        lr: AdamW learning rate of theta_d at d = 1000; a run at d uses :func:`subspace_lr` ``(lr, d)``.
        full_lr: learning rate of full fine-tuning, which runs the same ``steps`` on the same batches.
        full_metric: a full fine-tuning metric measured before; given, the full run is skipped.

    Returns:
        The result; ``note`` says in words when no d reached 90% of full fine-tuning.

    Raises:
        ValueError: as :func:`check_dims` (before any training) and :func:`train_run`.
    """
    num_params = parameter_count(model)
    check_dims(dims, num_params, len(list(model.parameters())) if said else 0)
    baseline = float(task.evaluate(model.eval()))
    say(f"D = {num_params:,} parameters; {task.metric} before training: {baseline:.4f}")
    full = None
    if full_metric is None:
        full = train_run(model, task, None, steps, full_lr, seed=seed)
        full_metric = full.metric
        say(f"full fine-tuning: {task.metric} {full.metric:.4f}, {full.seconds_per_step:.2f} s/step")
    runs = []
    for d in dims:
        try:
            runs.append(train_run(model, task, d, steps, subspace_lr(lr, d), said, seed))
        except NonFiniteLossError as err:  # one diverged d is a data point (metric NaN), not the end of the sweep
            say(f"d = {d}: {err}")
            runs.append(RunResult(d, math.nan, math.nan, math.nan, 0, 0, d))
            continue
        say(f"d = {d}: {task.metric} {runs[-1].metric:.4f}, {runs[-1].seconds_per_step:.2f} s/step, "
            f"peak +{runs[-1].peak_memory_bytes / 2**20:.0f} MiB")
    result = IntrinsicResult(task.name, task.metric, num_params, said, steps, baseline, full, runs,
                             find_d90({r.d: r.metric for r in runs}, full_metric), 0.9 * full_metric)
    if full_metric <= 0:
        result.note = f"full fine-tuning scored {full_metric:g}, so 90% of it is no bar: d90 is undefined."
    elif result.d90 is None:
        result.note = (f"no d in {dims} reached 90% of full fine-tuning ({task.metric} >= {0.9 * full_metric:.4f}); "
                       f"d90 is larger than {max(dims)} at {steps} steps.")
    else:
        result.note = f"d90 = {result.d90}: the smallest d with {task.metric} >= {0.9 * full_metric:.4f}."
    say(result.note)
    return result

