import jax
import numpy as np
import pytest

from fedjax_sim.core import Evaluator, summarize
from fedjax_sim.models import logistic_regression
from tests.conftest import packed_dataset

SIZES = [3, 0, 5, 17, 1, 8, 0, 11]  # two empty clients; several padding levels at granularity 4
MODEL = logistic_regression((5,), 3)


def _numpy_per_client(data, params):
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  out = {}
  for i in range(data.num_clients):
    c = data.client(i)
    if len(c["y"]) == 0:
      continue
    logits = c["x"].astype(np.float64) @ w + b
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    out[i] = {"loss_sum": -log_p[np.arange(len(c["y"])), c["y"]].sum(),
              "accuracy_sum": float((logits.argmax(1) == c["y"]).sum()),
              "examples": float(len(c["y"]))}
  return out


@pytest.fixture(scope="module")
def evaluated():
  data = packed_dataset(SIZES, num_features=5, num_classes=3, seed=4)
  params = MODEL.init(jax.random.key(5))
  evaluator = Evaluator(MODEL, data, block_size=2, granularity=4, key=jax.random.key(1))
  return data, params, evaluator, evaluator.per_client(params)


def test_per_client_sums_match_numpy_and_skip_empty_clients(evaluated):
  data, params, _, per_client = evaluated
  ref = _numpy_per_client(data, params)
  ids = per_client["client_ids"]
  assert sorted(ids.tolist()) == sorted(ref) == [0, 2, 3, 4, 5, 7]
  assert set(per_client) == {"client_ids", "loss_sum", "examples", "accuracy_sum"}
  for k in ("loss_sum", "examples", "accuracy_sum"):
    assert per_client[k].shape == ids.shape
    np.testing.assert_allclose(per_client[k], [ref[int(i)][k] for i in ids], rtol=1e-5,
                               atol=1e-5)


def test_summary_statistics_match_numpy(evaluated):
  data, params, evaluator, _ = evaluated
  ref = _numpy_per_client(data, params)
  s = evaluator(params)
  n = np.array([r["examples"] for r in ref.values()])
  assert s["eval_clients"] == 6 and s["eval_examples"] == sum(SIZES)
  for name in ("loss", "accuracy"):
    sums = np.array([r[f"{name}_sum"] for r in ref.values()])
    per = sums / n
    np.testing.assert_allclose(s[f"eval_{name}"], sums.sum() / n.sum(), rtol=1e-5)
    np.testing.assert_allclose(s[f"eval_{name}_client_mean"], per.mean(), rtol=1e-5)
    np.testing.assert_allclose(s[f"eval_{name}_client_median"], np.median(per), rtol=1e-5)
    np.testing.assert_allclose(s[f"eval_{name}_client_std"], per.std(), rtol=1e-5, atol=1e-7)
  # The worst decile: the highest losses, the lowest accuracies.
  per = np.array([r["loss_sum"] for r in ref.values()]) / n
  np.testing.assert_allclose(s["eval_loss_client_p90"], np.percentile(per, 90), rtol=1e-5)
  assert "eval_loss_client_p10" not in s
  per = np.array([r["accuracy_sum"] for r in ref.values()]) / n
  np.testing.assert_allclose(s["eval_accuracy_client_p10"], np.percentile(per, 10), rtol=1e-5,
                             atol=1e-6)
  # Weighted accuracy is total correct over total examples, not the mean of client accuracies.
  correct = sum(r["accuracy_sum"] for r in ref.values())
  np.testing.assert_allclose(s["eval_accuracy"], correct / sum(SIZES), rtol=1e-6)


def test_summarize_of_hand_values():
  per_client = {"client_ids": np.array([4, 1, 7, 2]),
                "examples": np.array([10.0, 2.0, 4.0, 4.0]),
                "loss_sum": np.array([5.0, 2.0, 1.0, 8.0]),
                "accuracy_sum": np.array([9.0, 0.0, 2.0, 4.0])}
  s = summarize(per_client)
  assert s["eval_clients"] == 4 and s["eval_examples"] == 20
  assert s["eval_accuracy"] == pytest.approx(15 / 20)
  per_acc = np.array([0.9, 0.0, 0.5, 1.0])
  assert s["eval_accuracy_client_mean"] == pytest.approx(per_acc.mean())
  assert s["eval_accuracy_client_median"] == pytest.approx(0.7)
  assert s["eval_accuracy_client_p10"] == pytest.approx(np.percentile(per_acc, 10))
  assert s["eval_loss"] == pytest.approx(16 / 20)
  assert s["eval_loss_client_median"] == pytest.approx(np.median([0.5, 1.0, 0.25, 2.0]))
  # Worst decile of loss by hand: sorted [0.25, 0.5, 1, 2], 90th percentile at
  # position 0.9 * 3 = 2.7 -> 1 + 0.7 * (2 - 1) = 1.7.
  assert s["eval_loss_client_p90"] == pytest.approx(1.7)
  assert s["eval_accuracy_client_std"] == pytest.approx(np.std(per_acc))
  assert "eval_client_ids" not in s and "eval_examples_client_mean" not in s


def test_evaluating_only_empty_clients_reports_zero_examples():
  data = packed_dataset([0, 0, 0], num_features=5, num_classes=3)
  s = Evaluator(MODEL, data, block_size=2, granularity=4, key=jax.random.key(1))(MODEL.init(jax.random.key(0)))
  assert s["eval_examples"] == 0 and s["eval_clients"] == 0


def test_ratio_metrics_divide_by_their_own_count_and_skip_clients_with_none():
  # A ratio metric (e.g. token accuracy) carries `<name>_count`: the total is
  # sum(num) / sum(count), and a client with nothing to count is not scored.
  per_client = {"client_ids": np.array([0, 1, 2]), "examples": np.array([2.0, 3.0, 1.0]),
                "loss_sum": np.array([1.0, 1.0, 1.0]),
                "accuracy_sum": np.array([3.0, 0.0, 0.0]),
                "accuracy_count": np.array([4.0, 6.0, 0.0])}
  s = summarize(per_client)
  assert s["eval_accuracy"] == pytest.approx(3 / 10)
  assert s["eval_accuracy_client_mean"] == pytest.approx((0.75 + 0.0) / 2)
  assert "eval_accuracy_count" not in s and s["eval_loss"] == pytest.approx(3 / 6)
