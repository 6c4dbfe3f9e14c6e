"""The convergence plot of a run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedjax_sim.runner.io import atomic_write  # noqa: E402


def convergence_plot(records: list[dict], path: str, title: str = "") -> None:
  """Training loss and evaluation accuracy against rounds, saved as PNG."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  rounds = [r["round"] for r in records if "train_loss" in r]
  ax_loss.plot(rounds, [r["train_loss"] for r in records if "train_loss" in r], label="train")
  ev = [r for r in records if "eval_loss" in r]
  if ev:
    ax_loss.plot([r["round"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax_acc.plot([r["round"] for r in ev], [r["eval_accuracy"] for r in ev], "o-",
                label="eval (example-weighted)")
    if "eval_loss_client_p90" in ev[0]:
      ax_loss.plot([r["round"] for r in ev], [r["eval_loss_client_p90"] for r in ev], "x--",
                   label="eval, worst 10% of clients (90th pct.)")
    if "eval_accuracy_client_p10" in ev[0]:
      ax_acc.plot([r["round"] for r in ev], [r["eval_accuracy_client_p10"] for r in ev], "x--",
                  label="eval, worst 10% of clients (10th pct.)")
  tr = [r for r in records if "train_accuracy" in r]
  ax_acc.plot([r["round"] for r in tr], [r["train_accuracy"] for r in tr], alpha=0.6,
              label="train (during local steps)")
  ax_loss.set(xlabel="round", ylabel="loss", title="loss")
  ax_acc.set(xlabel="round", ylabel="accuracy", title="accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  # Fixed margins for this fixed layout: `tight_layout` measures every label first, which
  # took about as long as drawing in a profile of a small sweep (every run and every sweep
  # member draws this plot).
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.86 if title else 0.9,
                      wspace=0.22)
  atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100,
                                             pil_kwargs={"compress_level": 1}))
  plt.close(fig)
