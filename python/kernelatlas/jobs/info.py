"""``kernelatlas info``: what a corpus holds, as text (the dict is :meth:`kernelatlas.corpus.Corpus.summary`)."""

from __future__ import annotations

from kernelatlas.corpus import Corpus

__all__ = ["info_text"]

MODEL_COLUMNS_SHOWN = ["model_id", "name", "format", "weight_set", "n_layers", "n_kernels"]


def info_text(corpus: Corpus, *, models: bool = False) -> str:
    """Counts by model, layer kind and kernel size; with ``models``, one line per model."""
    s = corpus.summary()
    by_kind = ", ".join(f"{k} {v:,}" for k, v in sorted(s["layers_by_kind"].items()))
    lines = [
        f"corpus      {s['path']}  ({s['dtype']}, {s['shards']} shards, {s['disk_bytes'] / 2**20:,.1f} MiB)",
        f"models      {s['models']:,}",
        f"layers      {s['layers']:,}  ({by_kind})",
        f"kernels     {s['kernels_stored']:,} stored; all-zero {s['zero_kernels']:,}, non-finite "
        f"{s['nonfinite_kernels']:,}",
        "by size     kind: kernels (stored)",
    ]
    for size, kinds in sorted(s["kernels_by_size"].items(), key=lambda kv: [int(x) for x in kv[0].split("x")]):
        parts = [f"{kind} {n:,} ({kinds.get(kind + '_stored', 0):,})" for kind, n in sorted(kinds.items())
                 if not kind.endswith("_stored")]
        lines.append(f"  {size:<9} " + ", ".join(parts))
    if models:
        lines.append(corpus.models[MODEL_COLUMNS_SHOWN].to_string(index=False))
    return "\n".join(lines)
