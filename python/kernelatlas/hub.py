"""Checkpoints on the Hugging Face Hub as corpus sources: ``hf:ORG/NAME[@REVISION]``.

The model's weight file is resolved and downloaded by huggingface_hub itself, so its cache and environment apply
as everywhere else: HF_HOME / HF_HUB_CACHE (where), HF_HUB_OFFLINE=1 (the cache only), HF_TOKEN (gated and
private models); downloads show progress and resume.  The file taken is the first of :data:`WEIGHT_FILES` the
repository holds (safetensors first; a ``.bin`` is read weights-only, like every torch file).  What is recorded
per model (models.parquet columns): ``hf_repo``, ``hf_revision`` (the commit the file came from), ``hf_file``;
the sha256 of the file is the model's corpus key; and from the repository's config.json where present (timm
writes one) ``family`` (its architecture), ``dataset`` (the pretrained tag, e.g. ``fb_in22k_ft_in1k``) and
``task``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PREFIX", "WEIGHT_FILES", "HubError", "HubModel", "is_hub_spec", "parse_spec", "resolve"]

PREFIX = "hf:"
# in the order they are tried: timm and transformers write model.safetensors, open_clip its own names
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                "open_clip_pytorch_model.bin")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(RuntimeError):
    """A Hub model that cannot be resolved (missing, gated, unreachable, no weight file); one line naming it."""


@dataclass(frozen=True)
class HubModel:
    spec: str               # as given, hf:ORG/NAME[@REV]
    repo: str
    revision: str           # the commit hash the file was resolved at
    filename: str           # which of WEIGHT_FILES
    path: Path              # the file in the Hub cache (a snapshot path)
    meta: dict[str, str] = field(default_factory=dict)  # models.parquet columns


def is_hub_spec(text: str) -> bool:
    return str(text).startswith(PREFIX)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """(repo id, revision or None) of ``hf:ORG/NAME[@REVISION]``; ValueError naming the spec when malformed."""
    body = str(spec)[len(PREFIX):] if is_hub_spec(spec) else str(spec)
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo) or ".." in repo:
        raise ValueError(f"{spec}: not a Hub model id (hf:ORG/NAME, optionally @REVISION), e.g. "
                         "hf:timm/convnext_tiny.fb_in1k")
    if revision and (not _REVISION.match(revision) or ".." in revision):
        raise ValueError(f"{spec}: {revision!r} is not a revision (a branch, tag or commit hash)")
    return repo, revision or None


def _config_meta(config: dict[str, Any]) -> dict[str, str]:
    """family / dataset / task from a config.json (timm's layout: architecture, pretrained_cfg.tag, num_classes;
    transformers': architectures)."""
    meta: dict[str, str] = {}
    arch = config.get("architecture")
    if not arch and isinstance(config.get("architectures"), list) and config["architectures"]:
        arch = config["architectures"][0]
    if isinstance(arch, str) and arch:
        meta["family"] = arch
    cfg = config.get("pretrained_cfg")
    if isinstance(cfg, dict) and isinstance(cfg.get("tag"), str) and cfg["tag"]:
        meta["dataset"] = cfg["tag"]
    classes = config.get("num_classes")
    if isinstance(classes, int) and classes > 0:
        meta["task"] = "classification"
    return meta


def resolve(spec: str, *, progress: bool = True) -> HubModel:
    """Download (or find in the cache) the weight file of ``hf:ORG/NAME[@REVISION]``.  HubError with one line
    naming the model when it is missing, gated, private, unreachable or holds no weight file."""
    repo, revision = parse_spec(spec)
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants, errors
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise HubError(f"{spec}: hf: sources need huggingface_hub (pip install huggingface_hub)") from None
    if not progress:
        disable_progress_bars()
    local_misses = 0
    path = None
    filename = ""
    for filename in WEIGHT_FILES:
        try:
            path = Path(hub.hf_hub_download(repo, filename, revision=revision))
            break
        except errors.GatedRepoError:
            raise HubError(f"{spec}: a gated model: accept its terms on https://huggingface.co/{repo} and set "
                           "HF_TOKEN") from None
        except errors.RepositoryNotFoundError:
            raise HubError(f"{spec}: no such model on the Hub (or a private one: set HF_TOKEN)") from None
        except errors.RevisionNotFoundError:
            raise HubError(f"{spec}: the model has no revision {revision!r}") from None
        except errors.LocalEntryNotFoundError:
            # offline, or the Hub unreachable, and not in the cache under this name: look for the other names in
            # the cache only (asking the Hub again would wait for its timeout once per name)
            local_misses += 1
            for other in WEIGHT_FILES[WEIGHT_FILES.index(filename) + 1:]:
                found = hub.try_to_load_from_cache(repo, other, revision=revision)
                if isinstance(found, str):
                    path, filename = Path(found), other
                    break
            break
        except errors.EntryNotFoundError:
            pass  # the repository has no file of this name: try the next
        except (errors.HfHubHTTPError, OSError) as exc:
            raise HubError(f"{spec}: the Hub could not be reached ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'})") from None
    if path is None:
        if local_misses:
            raise HubError(f"{spec}: not in the local Hub cache ({constants.HF_HUB_CACHE}) and the Hub is not "
                           "reachable (HF_HUB_OFFLINE set, or no network): download it once online")
        raise HubError(f"{spec}: the model holds none of {', '.join(WEIGHT_FILES)}")
    commit = path.parent.name if _COMMIT.match(path.parent.name) else (revision or "")
    meta = {"hf_repo": repo, "hf_revision": commit, "hf_file": filename}
    try:
        config_path = Path(hub.hf_hub_download(repo, "config.json", revision=commit or revision))
        config = json.loads(config_path.read_text())
        if isinstance(config, dict):
            meta.update(_config_meta(config))
    except (errors.EntryNotFoundError, errors.HfHubHTTPError, OSError, ValueError):
        pass  # no config.json (or unreadable): the model is still extracted, without those facts
    return HubModel(spec=str(spec), repo=repo, revision=commit, filename=filename, path=path, meta=meta)
