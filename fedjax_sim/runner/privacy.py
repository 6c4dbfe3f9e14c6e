"""The privacy report on disk: `privacy_report.json` and its Markdown rendering.

The plan (calibration, ledger, stage) and the report dict come from
`fedjax_sim.privacy.mechanisms` (re-exported here); the runner asks the
ledger how many rounds the budget affords, adds `dp_epsilon` to every round's
metrics and writes both files atomically.
"""

from __future__ import annotations

import json
import math
import os

from fedjax_sim.privacy.mechanisms import (PrivacyPlan, PrivacyUtilityWarning, plan_privacy,
                                           privacy_report)
from fedjax_sim.runner.io import atomic_write_text


# The JSON keys every DP run's report carries (more may follow).
REQUIRED_KEYS = ("mechanism", "epsilon", "delta", "noise_multiplier", "clip_norm", "rounds",
                 "sampling", "sampling_rate", "num_clients", "clients_per_round", "accountant")


def _fmt(x) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    if math.isinf(x):
      return "inf"
    return f"{x:.6g}"
  return str(x)


def render_markdown(report: dict) -> str:
  """A human-readable rendering of a report dict (the same facts as the JSON)."""
  lines = [f"# Privacy report: {report['mechanism']}", ""]
  eps = report["epsilon"]
  lines += [f"After **{report['rounds']}** round(s) the run is "
            f"**({_fmt(eps)}, {_fmt(report['delta'])})-DP** at the level of one "
            f"{report.get('unit', 'client')}, by the {report['accountant'].upper()} accountant of "
            "dp-accounting.", ""]
  if report.get("utility_warning"):
    lines += [f"**Utility warning.** {report['utility_warning']}", ""]
  if report.get("stopped_by_budget"):
    lines += [f"The run stopped before its planned {report.get('rounds_planned')} rounds: "
              f"{report['stopped_by_budget']}", ""]
  lines += ["| setting | value |", "|---|---|"]
  skip = {"epsilon_per_round", "clip_norm_trajectory", "assumptions", "epsilon_by_client_size",
          "covered_metrics", "raw_diagnostic_metrics",
          "utility_warning"}
  for key, value in report.items():
    if key in skip:
      continue
    if isinstance(value, dict):
      value = ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    lines.append(f"| {key} | {_fmt(value)} |")
  lines.append("")
  per_round = report.get("epsilon_per_round") or []
  clips = report.get("clip_norm_trajectory") or []
  if per_round:
    lines += ["## Epsilon per round", ""]
    header = "| round | epsilon |" + (" clip norm |" if clips else "")
    lines += [header, "|---|---|" + ("---|" if clips else "")]
    n = len(per_round)
    shown = sorted(set(range(0, n, max(1, n // 40))) | {n - 1})
    for i in shown:
      row = f"| {i + 1} | {_fmt(per_round[i])} |"
      if clips:
        row += f" {_fmt(clips[i]) if i < len(clips) else '-'} |"
      lines.append(row)
    if len(shown) < n:
      lines.append(f"\n({len(shown)} of {n} rounds shown; the JSON has every round.)")
    lines.append("")
  by_size = report.get("epsilon_by_client_size")
  if by_size:
    lines += ["## Epsilon by client dataset size", "", "| examples | epsilon |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in by_size.items()]
    lines.append("")
  if report.get("raw_diagnostic_metrics"):
    lines += ["## Metrics the guarantee covers", "",
              "Covered (the noisy release and what is computed from it): "
              + ", ".join(f"`{k}`" for k in report.get("covered_metrics", [])) + ".", "",
              "Raw diagnostics, computed from the clients' data and the exact cohort, not "
              "covered (a deployment would not publish them): "
              + ", ".join(f"`{k}`" for k in report["raw_diagnostic_metrics"]) + ".", ""]
  lines += ["## Assumptions behind the guarantee", ""]
  lines += [f"- {a}" for a in report.get("assumptions", [])]
  return "\n".join(lines) + "\n"


def write_privacy_report(out_dir: str, report: dict) -> None:
  """Writes both files atomically (a crash leaves the previous version intact)."""
  missing = [k for k in REQUIRED_KEYS if k not in report]
  if missing:
    raise ValueError(f"privacy report is missing keys {missing}.")
  atomic_write_text(os.path.join(out_dir, "privacy_report.json"),
                    json.dumps(report, indent=2, sort_keys=False) + "\n")
  atomic_write_text(os.path.join(out_dir, "privacy_report.md"), render_markdown(report))




__all__ = ["PrivacyPlan", "PrivacyUtilityWarning", "REQUIRED_KEYS", "plan_privacy",
           "privacy_report", "render_markdown", "write_privacy_report"]
