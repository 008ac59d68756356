"""``peft-cp-merge library {train,info,merge,push,build}``.

The top-level parser (:mod:`peft_cp_merge.cli`) calls :func:`add_subcommands`; every sub-command sets ``func``
(``args.func(args) -> int``). Under ``accelerate launch`` run the package's CLI as a module::

    accelerate launch --num_processes 8 -m peft_cp_merge.cli library train --config library.yaml

Building the parsers imports nothing heavy (the config module needs only yaml); each command imports the trainer,
library or Hub code when it runs. :data:`DESCRIPTION` is the text users see in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path

# through the package, whose import fails (naming the extra) when the trainer's dependencies are missing
from ..library import LibraryConfigError, LibraryTrainConfig
from . import key_value, yaml_value

DESCRIPTION = """\
Train and use TC-LoRA adapter libraries: cluster a dataset's examples in embedding space, train one LoRA adapter per
cluster, then inspect the library, merge its adapters into one, or upload it to the Hub. Or build a library from
LoRA adapters you already have (clustered by their parameters, each cluster merged into one adapter).

examples:
  peft-cp-merge library train --dataset data.jsonl --output-dir my-library --num-clusters 4
  peft-cp-merge library train --config library.yaml --set lora_r=16 --print-config
  accelerate launch --num_processes 8 -m peft_cp_merge.cli library train --config library.yaml
  peft-cp-merge library info my-library
  peft-cp-merge library merge my-library --method cp --weights size --out merged-adapter
  peft-cp-merge library push my-library user/my-library --private
  peft-cp-merge library build ./loras/* user/some-lora --out my-library --method cp

Each command has its own --help (train lists every config field with its default).
"""


def _shown(value) -> str:
    """A config default as the user would type it (YAML: null, true; a list as the words after the flag)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def _metavar(f: dataclasses.Field, tp) -> str:
    """The placeholder of a config field's flag: its ``metavar`` or ``choices`` metadata, else from its type."""
    if "metavar" in f.metadata:
        return f.metadata["metavar"]
    if "choices" in f.metadata:
        return "{" + ",".join(f.metadata["choices"]) + "}"
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)  # X | None -> X
    return {int: "N", float: "FLOAT"}.get(base, "VALUE")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="cluster the data and train one LoRA per cluster (runs unchanged under accelerate launch)",
        description="Train a TC-LoRA adapter library. Values come from --config (YAML), then --set key=value, then "
        "the per-field flags below (values parsed as YAML: null, 4, [q_proj, v_proj]).",
    )
    p.add_argument("--config", type=Path, default=None, metavar="PATH",
                   help="YAML file with config fields (the names of the flags below, with _ for -)")
    p.add_argument("--set", action="append", type=key_value, default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--wait", action="store_true",
                   help="if another run is writing output_dir, wait for it instead of refusing")
    g = p.add_argument_group("config fields (override --config; values parsed as YAML, null = unset)")
    hints = typing.get_type_hints(LibraryTrainConfig)
    for f in dataclasses.fields(LibraryTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = f"--{'' if default else 'no-'}{f.name.replace('_', '-')}" if tp is bool else _shown(default)
        help_ = (f.metadata.get("help", "") + f" (default: {shown})").replace("%", "%%")
        if tp is bool:
            g.add_argument(flag, dest=f"cfg_{f.name}", action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_)
        elif typing.get_origin(tp) is list:
            g.add_argument(flag, dest=f"cfg_{f.name}", nargs="+", default=argparse.SUPPRESS,
                           metavar=_metavar(f, tp), help=help_)
        else:
            g.add_argument(flag, dest=f"cfg_{f.name}", type=yaml_value, default=argparse.SUPPRESS,
                           metavar=_metavar(f, tp), help=help_)
    p.set_defaults(func=cmd_train)


def config_from_args(args) -> LibraryTrainConfig:
    overrides = dict(args.overrides)
    overrides.update({k.removeprefix("cfg_"): v for k, v in vars(args).items() if k.startswith("cfg_")})
    for k in ("dataset", "output_dir", "base_model", "embedding_model", "lr_scheduler"):
        if k in overrides and overrides[k] is not None:
            overrides[k] = str(overrides[k])  # a name like "2024" or "yes" stays a string
    return LibraryTrainConfig.from_yaml(args.config, overrides)


def cmd_train(args) -> int:
    config = config_from_args(args)
    if args.print_config:
        print(config.to_yaml())
        return 0
    from ..library.train import train_library

    try:
        lib = train_library(config, wait=args.wait)
    except KeyboardInterrupt as e:  # cli.main prints it; a resumable library is kept, and said so
        if (Path(config.output_dir) / "library.json").is_file():
            e.peft_cp_merge_note = (f"nothing half-written: the clusters finished so far stay in "
                                    f"{config.output_dir}; rerun the same command to resume")
        raise
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(f"Library written to {lib.path} ({lib.num_clusters} clusters)\n\n{lib.cluster_table()}")
    return 0


def cmd_info(args) -> int:
    from ..library import AdapterLibrary

    lib = AdapterLibrary.from_pretrained(args.library, verify=not args.no_verify)
    if args.json:
        print(json.dumps(lib.meta, indent=2))
        return 0
    m = lib.meta
    if lib.kind == "built":
        merge = m.get("merge", {})
        print(f"{lib.path}\n  base model:      {m.get('base_model')}\n  kind:            built from "
              f"{m.get('num_adapters')} existing adapters (no embedding model: route with arrow_model)"
              f"\n  clusters:        {lib.num_clusters}\n  merge:           {merge.get('method')} at rank "
              f"{sorted({c.get('rank') for c in m['clusters']}, key=str)}\n")
        print(lib.cluster_table())
        return 0
    t = m.get("training", {})
    print(f"{lib.path}\n  base model:      {m.get('base_model')}\n  embedding model: {m.get('embedding_model')}"
          f"\n  status:          {m.get('status')}\n  examples:        {m.get('num_examples')}"
          f"\n  clusters:        {lib.num_clusters}"
          f"\n  LoRA:            r={t.get('lora_r')} alpha={t.get('lora_alpha')} "
          f"targets={t.get('target_modules')}\n  parallel mode:   {t.get('parallel_mode')} on "
          f"{m.get('num_processes')} process(es)\n")
    print(lib.cluster_table())
    return 0


def cmd_merge(args) -> int:
    from .._io import check_disjoint, check_output_folder, output_guard
    from ..library import AdapterLibrary

    out = Path(args.out)
    libraries = [args.library] if Path(args.library).exists() else []
    # before any work: an --out inside (or over) the library, an existing or an unwritable --out
    check_disjoint(out, libraries=libraries)
    check_output_folder(out, overwrite=args.overwrite, kind="merged-adapter")
    weights = args.weights
    if weights is not None and weights != ["size"]:
        try:
            weights = [float(w) for w in weights]
        except ValueError:
            raise LibraryConfigError(f"--weights {' '.join(weights)}: give one number per cluster, or 'size'."
                                     ) from None
    elif weights is not None:
        weights = "size"
    options = dict(args.option)
    with output_guard(out, kind="merged-adapter", overwrite=args.overwrite, wait=args.wait, libraries=libraries):
        lib = AdapterLibrary.from_pretrained(args.library, clusters=args.clusters)
        merged = lib.merge(method=args.method, weights=weights, rank=args.rank, **options)
        merged.save_pretrained(out, overwrite=args.overwrite, wait=args.wait)
    print(f"Merged {len(lib.available)} cluster adapters with {args.method!r} into {out}")
    return 0


def cmd_push(args) -> int:
    from ..library import AdapterLibrary

    lib = AdapterLibrary.from_pretrained(args.library)
    info = lib.push_to_hub(args.repo_id, private=args.private, revision=args.revision,
                           commit_message=args.commit_message)
    print(f"Pushed {lib.path} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def cmd_build(args) -> int:
    from ..library import AdapterLibrary

    lib = AdapterLibrary.from_adapters(
        args.sources, args.num_clusters, out=args.out, method=args.method, rank=args.rank, overwrite=args.overwrite,
        wait=args.wait, base_model=args.base_model, min_clusters=args.min_clusters, max_clusters=args.max_clusters,
        seed=args.seed, **dict(args.option))
    print(f"Library written to {lib.path} ({len(args.sources)} adapters in {lib.num_clusters} clusters, merged "
          f"with {args.method!r})\n\n{lib.cluster_table()}")
    return 0


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build", help="a library from existing LoRA adapters: cluster them by their parameters, merge each cluster",
        description="Build an adapter library from existing LoRA adapters for one base model: each adapter is "
        "embedded by a sketch of its updates, k-means on cosine similarity clusters them (k by silhouette unless "
        "--num-clusters), and each cluster's members are merged into one adapter, cluster_<i>. library.json "
        "lists the members. The result merges (library merge) and routes per token (AdapterLibrary.arrow_model); "
        "it has no text centroids for AdapterLibrary.route.",
    )
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="adapter folders or Hub ids (user/repo, user/repo/subfolder, user/repo@revision)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of the library")
    p.add_argument("--num-clusters", type=int, default=None, metavar="K",
                   help="number of clusters (default: chosen by silhouette in --min-clusters..--max-clusters)")
    p.add_argument("--min-clusters", type=int, default=2, metavar="K", help="smallest k tried (default: 2)")
    p.add_argument("--max-clusters", type=int, default=16, metavar="K", help="largest k tried (default: 16)")
    p.add_argument("--method", default="cp", metavar="NAME",
                   help="merge method of each cluster's members (default: cp); `peft-cp-merge methods` lists them")
    p.add_argument("--rank", type=int, default=None, metavar="N",
                   help="rank of every cluster adapter (default: the largest source rank)")
    p.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="merge-method option, e.g. --option cp_init=svd (repeatable; values parsed as YAML)")
    p.add_argument("--base-model", default=None, metavar="MODEL",
                   help="record this base model instead of requiring all sources to name the same one")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the sketch and k-means (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only an adapter library this tool wrote)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing --out, wait for it instead of refusing")
    p.set_defaults(func=cmd_build)


def add_library_commands(sub) -> None:
    """Add train/info/merge/push/build to an argparse sub-parsers object."""
    _add_train(sub)
    p = sub.add_parser("info", help="print a library's summary and cluster table")
    p.add_argument("library", metavar="LIBRARY", help="library folder or Hub repo id")
    p.add_argument("--json", action="store_true", help="print library.json")
    p.add_argument("--no-verify", action="store_true", help="skip the adapter checksums (e.g. while training)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("merge", help="merge a library's cluster adapters into one adapter (file engine)")
    p.add_argument("library", metavar="LIBRARY", help="library folder or Hub repo id")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder of the merged PEFT adapter")
    p.add_argument("--method", default="cp", metavar="NAME",
                   help="merge method (default: cp); `peft-cp-merge methods` lists them with their options")
    p.add_argument("--rank", type=int, default=None, metavar="N",
                   help="rank of the merged adapter (default: the largest cluster adapter rank)")
    p.add_argument("--weights", nargs="+", default=None, metavar="W",
                   help="one weight per cluster, or 'size' (weights proportional to cluster sizes; default: 1/T each)")
    p.add_argument("--clusters", nargs="+", type=int, default=None, metavar="I",
                   help="merge only these clusters (default: all)")
    p.add_argument("--option", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="merge-method option, e.g. --option cp_init=svd (repeatable; values parsed as YAML)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only a merged adapter this tool wrote)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing --out, wait for it instead of refusing")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("push", help="upload a library to the Hub in one commit")
    p.add_argument("library", metavar="LIBRARY", help="library folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub repo id (user/name); created if missing")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to push to (default: the repo's main branch)")
    p.add_argument("--commit-message", default=None, metavar="TEXT", help="commit message of the upload")
    p.set_defaults(func=cmd_push)
    _add_build(sub)


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add ``library`` (with train/info/merge/push) to the top-level CLI's sub-parsers."""
    p = subparsers.add_parser("library", help="TC-LoRA adapter libraries: train, info, merge, push, build",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="library_command", metavar="{train,info,merge,push,build}", required=True)
    add_library_commands(sub)
    return p

