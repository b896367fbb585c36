"""`r1 report RUN_DIR`: a run's curves as PNGs and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from r1cli.errors import R1Error
from r1cli.run.metrics import read_metrics

# (title, metric names drawn on one panel)
PANELS = [
    ("reward", ["reward/total", "reward/accuracy", "reward/format", "reward/format_partial", "reward/language"]),
    ("held-out accuracy", ["eval/accuracy"]),
    ("response length (tokens)", ["response_len/mean", "response_len/max"]),
    ("KL to reference", ["kl"]),
    ("entropy", ["entropy"]),
    ("clip fraction / truncation", ["clip_frac", "truncation_rate", "zero_var_groups"]),
    ("loss", ["loss"]),
    ("grad norm", ["grad_norm"]),
    ("tool use (share of samples)", ["tools/call_share", "tools/correct_with_call"]),
    ("turns and tool calls per sample", ["tools/turns", "tools/calls"]),
    ("engine vs trainer (off-policy)", ["rollout/mismatch_kl", "rollout/staleness"]),
    ("staleness of fully asynchronous samples (updates old)", [f"rollout/staleness_{k}" for k in range(9)] +
     ["rollout/dropped", "rollout/refreshed"]),
    ("idle shares and queue (fully asynchronous)", ["time/trainer_idle_share", "time/engine_idle_share",
                                                   "rollout/queue_depth", "rollout/worker_restarts"]),
    ("expert routing (1 = even)", ["moe/load_imbalance", "moe/load_min_share", "moe/balance"]),
    ("routing replay: share of token-layers routed as the engine did", ["moe/routing_agreement"]),
    ("critic (PPO): value loss and explained variance", ["critic/value_loss", "critic/explained_var"]),
]


def write_report(run_dir: str, out: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = Path(run_dir) / "metrics.jsonl"
    if not src.is_file():
        raise R1Error(f"no metrics.jsonl in {run_dir}")
    rows = read_metrics(src)
    out_dir = Path(out or run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    no_kl = _kl_weight(Path(run_dir)) == 0.0
    figures = []
    for title, names in PANELS:
        series = {n: [(r["step"], r[n]) for r in rows if isinstance(r.get(n), (int, float))] for n in names}
        series = {n: s for n, s in series.items() if s}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4))
        if names == ["kl"] and no_kl:  # a flat line at 0 would read as "the policy stayed on the reference"
            ax.text(0.5, 0.5, "β = 0: no KL (no reference model)", ha="center", va="center", fontsize=13,
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            for name, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker="o" if len(pts) < 20 else None)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        fig.tight_layout()
        png = out_dir / f"{title.split(' ')[0].replace('/', '_')}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        figures.append((title + (" (β = 0: no KL)" if names == ["kl"] and no_kl else ""), png))
    if not figures:
        raise R1Error(f"{src} has no metrics to draw")
    page = out_dir / "report.html"
    imgs = "\n".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in figures)
    last = {k: v for r in rows for k, v in r.items() if k not in ("time",)}
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in last.items()
                    if isinstance(v, (int, float)))
    page.write_text(f"<!doctype html><meta charset='utf-8'><title>r1 report: {html.escape(str(run_dir))}</title>"
                    f"<style>body{{font-family:sans-serif}}figure{{display:inline-block;margin:8px}}</style>"
                    f"<h1>{html.escape(str(run_dir))}</h1>{imgs}<h2>last values</h2><table>{table}</table>")
    return page


def _kl_weight(run_dir: Path) -> float | None:
    """grpo.beta from the run's merged config.yaml (None when unknown)."""
    import yaml

    try:
        beta = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("grpo", {}).get("beta")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return float(beta) if isinstance(beta, (int, float)) else None
