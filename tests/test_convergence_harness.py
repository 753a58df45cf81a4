"""Tests for benchmarks/harness.py against hand-made curves with closed-form answers, and
for benchmarks/convergence.py's targets and flags. No wall-clock thresholds."""

from __future__ import annotations

import math
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jkfac
from tests import _nets

ROOT = pathlib.Path(__file__).resolve().parents[1]


from benchmarks import harness  # noqa: E402


def _run(losses, seconds=None, diverged=False, evals=()) -> harness.Run:
  losses = np.asarray(losses, np.float64)
  seconds = np.arange(1, len(losses) + 1) * 0.5 if seconds is None else np.asarray(seconds)
  return harness.Run(losses, seconds, [harness.Eval(*e) for e in evals], diverged)


@pytest.mark.parametrize("window", [1, 3, 5])
def test_running_mean_of_a_ramp(window):
  n = 12
  values = np.arange(1, n + 1, dtype=np.float64)        # 1, 2, ..., n
  i = np.arange(n)
  # The mean of the consecutive integers from max(1, i - w + 2) to i + 1.
  expected = np.where(i >= window - 1, i + 1 - (window - 1) / 2, (i + 2) / 2)
  np.testing.assert_allclose(harness.running_mean(values, window), expected)


def test_time_to_target_geometric_curve():
  k = np.arange(1, 21)
  losses, seconds = 2.0 ** -k, 0.5 * k
  # window 1: 2^-k <= 1/16 first at k = 4.
  assert harness.time_to_target(losses, seconds, 1 / 16, window=1) == (4, 2.0)
  # window 2: (2^-(k-1) + 2^-k) / 2 = 3 * 2^-(k+1) <= 3/64 first at k = 5.
  assert harness.time_to_target(losses, seconds, 3 / 64, window=2) == (5, 2.5)
  assert harness.time_to_target(losses, seconds, 0.0, window=2) is None
  assert harness.time_to_target(losses, seconds, math.nan) is None


def test_time_to_target_sparse_accuracy():
  steps, seconds, accs = [20, 40, 60], [1.0, 2.0, 3.0], [0.9, 0.981, 0.99]
  hit = harness.time_to_target(accs, seconds, 0.98, window=1, steps=steps, higher_is_better=True)
  assert hit == (40, 2.0)
  assert harness.time_to_target(accs, seconds, 0.995, window=1, steps=steps,
                                higher_is_better=True) is None


def test_final_loss_metric_and_score():
  r = _run([5.0, 1.0, 2.0, 3.0], evals=[(2, 1.0, {"acc": 0.5}), (4, 2.0, {"acc": 0.75})])
  assert r.final_loss(window=3) == 2.0 and r.final_metric("acc") == 0.75
  assert r.score() == r.final_loss() == 2.75 and r.score("acc") == 0.75
  assert math.isnan(_run([]).final_loss(window=3)) and math.isnan(r.final_metric("loss"))
  assert math.isnan(_run([1.0], diverged=True).score())


def test_hit_smooths_the_training_loss_not_the_evaluations():
  k = np.arange(1, 21)
  r = _run(2.0 ** -k, seconds=0.5 * k,
           evals=[(5, 2.5, {"loss": 0.3}), (10, 5.0, {"loss": 0.1}), (15, 7.5, {"loss": 0.2})])
  r.start = 10  # a resumed run: its steps are 11..30
  # window 2: (2^-(k-1) + 2^-k) / 2 = 3 * 2^-(k+1) <= 3/64 first at k = 5, step 15.
  assert r.hit(harness.Target("loss", 3 / 64, "ref"), window=2) == (15, 2.5)
  # The evaluations as evaluated: 0.1 <= 0.15 at the second (no interpolation).
  assert r.hit(harness.Target("eval", 0.15, "ref", "loss")) == (10, 5.0)
  assert r.hit(harness.Target("eval", 0.05, "ref", "loss")) is None
  assert r.hit(harness.Target("eval", 0.15, "ref", "absent")) is None
  r.diverged = True
  assert r.hit(harness.Target("loss", 1.0, "ref")) is None


def test_sweep_picks_lowest_score_among_finished_runs():
  curves = {1: _run([3.0, 2.0]), 2: _run([3.0, 1.0]), 3: _run([3.0, 0.1], diverged=True),
            4: harness.Skipped("unsupported keyword x")}
  result = harness.sweep(curves.__getitem__, [1, 2, 3, 4])
  assert result.best == 2 and set(result.runs) == {1, 2, 3, 4}
  assert harness.sweep(lambda v: _run([1.0], diverged=True), [1, 2]).best is None
  by_eval = {1: _run([1.0], evals=[(1, 0.5, {"eval_loss": 2.0})]),
             2: _run([9.0], evals=[(1, 0.5, {"eval_loss": 1.0})])}
  assert harness.sweep(by_eval.__getitem__, [1, 2], metric="eval_loss").best == 2


@jax.jit
def _halve(state, batch):
  return state * batch, state  # loss = the state before the step


class _Recorder:
  """Stands in for `_progress.Progress`."""

  def __init__(self):
    self.updates = []

  def update(self, step, **metrics):
    self.updates.append((step, metrics))


@pytest.mark.parametrize("sync_every", [1, 3])
def test_run_trains_real_steps(sync_every):
  progress = _Recorder()
  result = harness.run(_halve, jnp.float32(8.0), iter(lambda: 0.5, None),
                       lambda s: {"x": float(s)}, steps=7,
                       eval_every=2, sync_every=sync_every, progress=progress)
  # Real steps from the initial state: the warm-up calls are discarded.
  np.testing.assert_allclose(result.losses, 8.0 * 0.5 ** np.arange(7))
  assert len(result.seconds) == 7 and np.all(np.diff(result.seconds) >= 0)
  assert result.seconds[0] > 0 and list(result.steps) == list(range(1, 8))
  assert not result.diverged and result.compile_seconds > 0
  assert float(result.state) == pytest.approx(8.0 * 0.5 ** 7)
  # Evaluations at the first synchronisation at or after each multiple of 2, and at the end.
  evaluated = {1: [2, 4, 6, 7], 3: [3, 6, 7]}[sync_every]
  assert [step for step, _, _ in result.evals] == evaluated
  assert result.evals[-1][2] == {"x": pytest.approx(8.0 * 0.5 ** 7)}
  # Progress gets every step's loss, and the evaluations' metrics at their steps.
  assert [step for step, _ in progress.updates] == list(range(1, 8))
  np.testing.assert_allclose([m["loss"] for _, m in progress.updates], result.losses)
  assert [step for step, m in progress.updates if "x" in m] == evaluated


def test_run_stops_on_divergence():
  # Losses 1, 2, 4, 8, 16: the fifth passes 10x the first.
  result = harness.run(_halve, jnp.float32(1.0), iter(lambda: 2.0, None), steps=50)
  assert result.diverged and len(result.losses) == 5
  result = harness.run(_halve, jnp.float32(1.0), iter(lambda: jnp.nan, None), steps=50)
  assert result.diverged and len(result.losses) == 2
  # Finite losses 1, 1, but the final state is infinite: diverged, and not evaluated.
  result = harness.run(_halve, jnp.float32(1.0), iter([1.0, jnp.inf]),
                       lambda s: {"x": float(s)}, steps=2)
  assert result.diverged and len(result.losses) == 2 and result.evals == []


def test_is_diverged():
  assert not harness.is_diverged([1.0, 9.9], first=1.0)
  assert harness.is_diverged([10.1], first=1.0) and harness.is_diverged([math.nan], 1.0)
  assert harness.is_diverged([-math.inf], first=1.0)


def test_try_build_reports_unsupported_keywords_and_values():
  def factory(a, *, b=1):
    if b < 0:
      raise ValueError("b must be >= 0")
    return a + b

  assert harness.try_build(factory, 1, b=2) == 3
  assert harness.try_build(factory, 1, c=2) == harness.Skipped("unsupported keyword c")
  assert harness.try_build(factory, 1, b=-1).reason.startswith("unsupported value (b must")


def test_format_table():
  table = harness.format_table(["a", "bb"], [["x", 1.23456], [None, math.nan]])
  assert table.splitlines() == ["| a | bb    |", "| - | ----- |", "| x | 1.235 |",
                                "| - | nan   |"]


def test_plot_writes_png(tmp_path):
  path = tmp_path / "curves.png"
  runs = {"a": _run([3.0, 2.0, 1.0], evals=[(3, 1.5, {"eval_loss": 1.2})]),
          "b": _run([1.0], diverged=True), "c": harness.Skipped("no")}
  harness.plot({"toy": runs}, str(path), eval_metric="eval_loss")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_csv_one_row_per_step(tmp_path):
  path = tmp_path / "m.csv"
  runs = {"a": _run([3.0, 2.0], evals=[(2, 1.0, {"eval_loss": 1.5})]),
          "b": harness.Skipped("no")}
  harness.write_csv(str(path), runs, ["eval_loss"])
  assert path.read_text().splitlines() == [
      "run,step,seconds,train_loss,eval_loss", "a,1,0.500000,3,", "a,2,1.000000,2,1.5"]


def test_run_rows():
  runs = {"a": _run([3.0, 1.0], evals=[(2, 1.0, {"acc": 0.5})]), "b": harness.Skipped("x")}
  rows = harness.run_rows(runs, ["acc"], best=["a"], window=1)
  assert rows == [["a", 1.0, 0.5, 500.0, "ok (2 steps) (best)"],
                  ["b", None, None, None, "skipped: x"]]
  assert len(harness.run_headers(["acc"])) == len(rows[0])


def test_target_rows_ratios_to_the_reference():
  k = np.arange(1, 11)
  runs = {"adam lr 0.001": _run(1.0 / k, seconds=0.1 * k,
                                evals=[(5, 0.5, {"test_acc": 0.97}), (10, 1.0,
                                                                     {"test_acc": 0.985})]),
          "kfac": _run(1.0 / (2 * k), seconds=0.4 * k, evals=[(5, 2.0, {"test_acc": 0.99})]),
          "kfac adaptive": harness.Skipped("unsupported keyword adapt_damping"),
          "sgd": _run(1.0 / k, diverged=True)}
  ref = "adam lr 0.001"
  found = [harness.Target("loss", 0.2, ref),
           harness.Target("98%", 0.98, ref, "test_acc", higher_is_better=True)]
  headers = harness.target_headers(found, ["test_acc"])
  assert headers[4:12] == ["steps to loss", "s to loss", "steps x adam", "s x adam",
                           "steps to 98%", "s to 98%", "steps x adam", "s x adam"]
  rows = {row[0]: row for row in harness.target_rows(runs, found, ["test_acc"])}
  assert all(len(row) == len(headers) for row in rows.values())
  assert rows["kfac adaptive"][-1] == "skipped: unsupported keyword adapt_damping"
  assert rows["sgd"][-1] == "diverged" and rows["sgd"][4] is None
  assert rows["kfac"][2] == 0.99
  assert rows["kfac"][8:12] == [5, 2.0, 0.5, 2.0]  # 98%: step 5 / 10, 2.0 s / 1.0 s
  assert rows[ref][-1] == "ok (10 steps), target not reached"  # adam never reaches 0.2
  harmonic = np.cumsum(1.0 / k) / k  # the running mean of 1/k (window 20 > 10 steps)
  target = float(harmonic[-1])  # adam reaches its own final loss at step 10
  rows = {row[0]: row for row in harness.target_rows(runs, [harness.Target("loss", target,
                                                                           ref)])}
  kfac_step = int(np.argmax(harmonic / 2 <= target)) + 1
  assert rows[ref][3:7] == [10, 1.0, 1.0, 1.0]
  assert rows["kfac"][3:7] == [kfac_step, pytest.approx(0.4 * kfac_step),
                               kfac_step / 10, pytest.approx(0.4 * kfac_step / 1.0)]


def test_eval_targets_without_interpolation():
  """A sparse eval-loss curve reaches the reference's final eval loss at an evaluated step."""
  ref = _run([3.0] * 3, seconds=[10.0, 20.0, 30.0],
             evals=[(100, 10.0, {"eval_loss": 3.0}), (200, 20.0, {"eval_loss": 2.5}),
                    (300, 30.0, {"eval_loss": 2.0})])
  fast = _run([3.0] * 3, evals=[(100, 20.0, {"eval_loss": 2.5}),
                                (200, 40.0, {"eval_loss": 1.5}),
                                (300, 60.0, {"eval_loss": 1.0})])
  never = _run([3.0] * 3, evals=[(100, 1.0, {"eval_loss": 9.0})])
  found = [harness.Target("eval loss", ref.final_metric("eval_loss"), "ref", "eval_loss")]
  rows = {row[0]: row for row in harness.target_rows(
      {"ref": ref, "fast": fast, "never": never}, found, ["eval_loss"])}
  assert rows["ref"][4:8] == [300, 30.0, 1.0, 1.0]
  assert rows["fast"][4:8] == [200, 40.0, pytest.approx(2 / 3), pytest.approx(4 / 3)]
  assert rows["never"][4:8] == [None] * 4 and rows["never"][-1].endswith("not reached")


# --- benchmarks/convergence.py ------------------------------------------------------------


@pytest.fixture(scope="module")
def convergence():
  return _nets.import_script(ROOT / "benchmarks" / "convergence.py", "convergence")


def test_models_and_steps_flags(convergence):
  args = convergence.parse_args([])
  assert args.models == convergence.MODELS == ("convnet", "mlp", "autoencoder", "lm", "lstm")
  assert [convergence.steps_for(m, args) for m in args.models] == [300, 300, 300, 400, 400]
  args = convergence.parse_args(["--models", "lstm,lm", "--steps", "5", "--ae-steps", "7"])
  assert args.models == ("lstm", "lm")
  assert convergence.steps_for("lm", args) == 5 and convergence.steps_for("autoencoder", args) == 7
  with pytest.raises(SystemExit):
    convergence.parse_args(["--models", "lstm,gru"])


def test_kfac_tables_are_keyword_dicts(convergence):
  for table in (convergence.CLASSIFIER_KFAC, convergence.MLP_KFAC, convergence.LM_KFAC,
                convergence.LSTM_KFAC):
    adaptive = {k for k, config in table.items() if convergence.is_adaptive(config)}
    assert "kfac adaptive" in adaptive and "kfac cov 1 / inv 10" not in adaptive
  assert convergence.LM_KFAC["kfac cov 1 / inv 10"]["momentum_type"] == "adam"
  assert convergence.is_adaptive(convergence.LSTM_KFAC["kfac cov 1 / inv 10, norm constraint"])


def test_lstm_problem_builds_or_skips_each_kfac_config(convergence):
  """An adaptive configuration builds where the installed jkfac takes its keywords, and is
  skipped, naming a keyword or value, where it does not."""
  args = convergence.parse_args(["--models", "lstm"])
  problem = convergence.sequence_problem(convergence.lstm, "lstm", args, 3,
                                         convergence.LSTM_KFAC, {"adam": (1e-3,)})
  assert problem.steps == 3 and problem.eval_every == args.eval_every
  assert set(problem.eval_fn((problem.params, None))) == {"eval_loss"}
  for label, config in problem.kfac_configs.items():
    tx = problem.make_kfac(config)
    if isinstance(tx, harness.Skipped):
      assert convergence.is_adaptive(config), label
      assert tx.reason.startswith("unsupported"), tx
    else:
      assert callable(tx.update), label


def test_robustness_variant_settings_are_keyword_literals():
  from benchmarks import robustness
  assert robustness.settings("invert_every=20, approximations={'*': 'ekfac', 'x': 'kron'}") == {
      "invert_every": 20, "approximations": {"*": "ekfac", "x": "kron"}}
  for bad in ("20", "**extra", "invert_every=lambda: 1"):
    with pytest.raises(ValueError):
      robustness.settings(bad)


@pytest.mark.parametrize("name", ["deepmlp", "convae", "vit", "gru", "dropout", "groupnorm",
                                  "deeptanh", "unet", "tiedae", "tokenlstm"])
def test_robustness_models_register_their_whole_loss(name):
  """Each added benchmark model's registered losses describe the loss it returns (no
  `LossScaleWarning`, which would turn into an error here), and every layer is found
  (the ViT's position embedding is no layer's)."""
  from benchmarks import robustness
  rng = np.random.default_rng(0)
  images = rng.random((16, 28, 28, 1), dtype=np.float32)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  data = robustness.batches(name, images, labels, 8, 2)
  loss_fn, params = robustness.make_model(name, data[0]["x"][:2])
  with warnings.catch_warnings():
    warnings.simplefilter("error", jkfac.LossScaleWarning)
    loss, registered = jkfac.check_loss_scale(loss_fn, params, data[0])
  np.testing.assert_allclose(registered, loss, rtol=1e-5)
  generic = [p.path for p in jkfac.describe(loss_fn, params, data[0]).parameters
             if p.kind == "generic"]
  # The ViT's position table is no layer's. The tied autoencoder's `w` is used both as
  # `x @ w` and `h @ w.T`, which no one layer block models: it and the biases of its
  # two uses get diagonal blocks (see docs/usage.md).
  assert generic == {"vit": ["position"], "tiedae": ["b", "c", "w"]}.get(name, [])


def test_robustness_vae_registers_its_reconstruction():
  """The VAE's registered loss is its reconstruction term (the KL term is not one of
  the registered kinds), recomputed here from the model's logits; every layer is found."""
  from benchmarks import robustness
  rng = np.random.default_rng(0)
  images = rng.random((16, 28, 28, 1), dtype=np.float32)
  data = robustness.batches("vae", images, np.zeros(16, np.int32), 8, 2)
  loss_fn, params = robustness.make_model("vae", data[0]["x"][:2])
  logits, _, _ = robustness.VAE().apply({"params": params}, data[0]["x"], data[0]["key"])
  pixels = data[0]["x"].reshape(8, -1)
  reconstruction = optax.sigmoid_binary_cross_entropy(logits, pixels).sum(-1).mean()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", jkfac.LossScaleWarning)
    loss, registered = jkfac.check_loss_scale(loss_fn, params, data[0])
  np.testing.assert_allclose(registered, reconstruction, rtol=1e-5)
  assert loss > registered  # the KL term
  assert [p.path for p in jkfac.describe(loss_fn, params, data[0]).parameters
          if p.kind == "generic"] == []
