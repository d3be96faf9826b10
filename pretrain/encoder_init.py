"""Where an encoder's first weights come from: ``model.init`` (pretraining) and ``init``
(fine-tuning), parsed once into one type that knows its kind, checks the architecture,
loads the weights and tells their history (the init chain).

Kinds: ``random``; ``timm`` ("timm" = timm's default pretrained weights of the
architecture, "timm:ARCH.TAG" a tagged set, through the Hugging Face hub cache); or a
local path: an ``export`` (folder, ``backbone.json`` or its ``backbone.safetensors``),
a ``run`` folder (its export), a pretraining ``checkpoint``, an ``epoch`` (a kept
``checkpoints/epochNNNN.pt`` of a run) or a ``weights file`` (timm-named
safetensors or torch state dict, e.g. ImageNet weights). A path that holds none of them
is ``unresolved``: loading it fails, a chain shows it. An ``s3://`` URL of any of these
is the same kind and loads the same weights (``pretrain.stored_init`` fetches its files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cluster.storage.urls import is_url, name_of, normalize, parent_of
from pretrain.encoder_errors import EncoderMismatchError
from pretrain.export_meta import BackboneMeta, find_backbone_meta
from pretrain.stored_init import StoredInit, locate, require

if TYPE_CHECKING:
    from torch import nn

    from pretrain.checkpoint_state import PretrainCheckpoint
    from pretrain.weights import EncoderWeights

# torch, timm and the weight readers are imported where they are used: both configs parse
# their init at load, and a config error should be reported before seconds of imports.

InitKind = Literal["random", "timm", "export", "run", "checkpoint", "epoch", "weights file",
                   "unresolved"]
InitChain = list[dict[str, Any]]
_MAX_CHAIN = 16  # a longer chain is a loop of exports naming each other


@dataclass(frozen=True)
class EncoderInit:
    text: str  # as written in the config
    key: str  # the config key it came from, named in every error ("model.init", "init")
    timm_name: str | None = None  # "ARCH" or "ARCH.TAG", for the timm kind

    @classmethod
    def parse(cls, text: str, arch: str, key: str) -> EncoderInit:
        """Parse ``text``; timm weights named for another architecture are refused here."""
        if not text:
            raise ValueError(f"{key}: empty; use 'random', 'timm', 'timm:ARCH.TAG' or a path")
        name = arch if text == "timm" else text.removeprefix("timm:") \
            if text.startswith("timm:") else None
        if name is not None and _family(name) != _family(arch):
            raise EncoderMismatchError(f"{key}: {text!r} names weights of another "
                                       f"architecture than arch {arch!r}")
        try:
            is_url(text)  # an unsupported scheme (gs://) is refused with the config
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
        return cls(text, key, name)

    @property
    def url(self) -> str | None:
        """The object-store URL the init names, if it names one."""
        named = self.text != "random" and self.timm_name is None and is_url(self.text)
        return normalize(self.text) if named else None

    @property
    def path(self) -> Path | None:
        """The local path the init names, if it names one."""
        named = self.text != "random" and self.timm_name is None and self.url is None
        return Path(self.text) if named else None

    @property
    def kind(self) -> InitKind:
        """What the init names, looking at the path as it is now."""
        if self.text == "random":
            return "random"
        if self.timm_name is not None:
            return "timm"
        return _path_kind(Path(self.text)) if self.url is None else \
            _stored_kind(locate(self.url))

    @property
    def epoch(self) -> int | None:
        """For a kept end-of-epoch checkpoint of a run: its epoch."""
        path = self.path
        if self.url is not None:  # by its name, as for a path
            path = Path(name_of(parent_of(self.url)), name_of(self.url))
        return None if path is None else _kept_epoch(path)

    def recorded(self) -> str:
        """The init as an export records it: a local path made absolute, so the chain
        behind the export still resolves from another working directory; a URL as is."""
        path = self.path
        if self.url is not None:
            return self.url
        return str(path.resolve()) if path is not None and path.exists() else self.text

    def build_encoder(self, arch: str, in_chans: int, img_size: int | None = None) -> nn.Module:
        """A timm encoder of ``arch`` (classifier removed) holding these weights; any
        mismatch of architecture, input channels, keys or shapes raises first."""
        from pretrain.weights import create_encoder, create_pretrained_encoder

        if self.timm_name is not None:
            return create_pretrained_encoder(self.timm_name, in_chans, img_size, key=self.key)
        encoder = create_encoder(arch, in_chans, img_size)
        if self.text == "random":
            return encoder
        if self.url is None:
            _load(encoder, Path(self.text), arch, in_chans)
            return encoder
        stored = require(self.url)
        with stored.naming_urls():
            _load(encoder, stored.local(), arch, in_chans)
        return encoder

    def chain(self, arch: str) -> InitChain:
        """Where the weights came from, newest first: this init, then what its pretraining
        started from, and so on (ImageNet -> natural images -> domain).

        Each link is a JSON-ready dict with ``init`` (as written) and ``kind`` ("random",
        "timm", "export", "checkpoint", "weights file" or "unresolved": a recorded path
        that no longer exists here); exports and checkpoints add what they record
        (method, epochs, data).
        """
        links: InitChain = []
        current: EncoderInit | None = self
        seen: set[str] = set()
        while current is not None and len(links) < _MAX_CHAIN:
            link, current, arch = current._link(arch)
            source = link.get("source")
            if source is not None:
                if source in seen:  # exports naming each other: stop at the repeat
                    break
                seen.add(source)
            links.append(link)
        return links

    def _link(self, arch: str) -> tuple[dict[str, Any], EncoderInit | None, str]:
        """This init's link of the chain, the init it started from (if recorded) and the
        architecture that one was for."""
        if self.text == "random":
            return {"init": self.text, "kind": "random"}, None, arch
        if self.timm_name is not None:
            return ({"init": self.text, "kind": "timm", "weights": self.timm_name,
                     **_hub_id(self.timm_name)}, None, arch)
        if self.url is None:
            path = Path(self.text)
            return self._file_link(_path_kind(path), path, _absolute, arch)
        stored = locate(self.url)
        kind = _stored_kind(stored)
        if stored is None or kind == "unresolved":
            return {"init": self.text, "kind": "unresolved", "source": self.url}, None, arch
        # an export's description is all a link reads: its weights stay in the store
        path = stored.local(description_only=kind in ("export", "run"))
        return self._file_link(kind, path, stored.url_of, arch)

    def _file_link(self, kind: InitKind, path: Path, source: Callable[[Path], str],
                   arch: str) -> tuple[dict[str, Any], EncoderInit | None, str]:
        """The link of a local file or folder (or the local copy of a URL's), its
        ``source`` told by ``source``."""
        if kind in ("export", "run"):
            meta_path = find_backbone_meta(path)
            assert meta_path is not None  # the kind says it is there
            return self._export_link(meta_path, source(meta_path), arch)
        if kind in ("checkpoint", "epoch"):
            return self._checkpoint_link(path, source(path), arch)
        return {"init": self.text, "kind": kind, "source": source(path)}, None, arch

    def _export_link(self, meta_path: Path, source: str,
                     arch: str) -> tuple[dict[str, Any], EncoderInit | None, str]:
        meta = BackboneMeta.read(meta_path)
        link: dict[str, Any] = {"init": self.text, "kind": "export", "source": source,
                                "architecture": meta.architecture, "in_chans": meta.in_chans,
                                "method": meta.method, "epochs": meta.epochs,
                                "planned_epochs": meta.planned_epochs, "steps": meta.steps,
                                "data": meta.data}
        if meta.checkpoint is not None:
            link["checkpoint"] = meta.checkpoint
        return link, self._parent(meta.init, meta.architecture), meta.architecture

    def _checkpoint_link(self, path: Path, source: str,
                         arch: str) -> tuple[dict[str, Any], EncoderInit | None, str]:
        saved = _peek_checkpoint(path)
        if saved is None:  # gone or changed since the kind was read
            return {"init": self.text, "kind": "unresolved", "source": source}, None, arch
        config = saved.config
        model = config.get("model", {})
        link = {"init": self.text, "kind": "checkpoint", "source": source,
                "architecture": model.get("arch"), "epochs": saved.epoch, "steps": saved.step,
                "method": config.get("method", {}).get("name"),
                "data": {"path": config.get("data", {}).get("path")}}
        parent_arch = model.get("arch") or arch
        return link, self._parent(model.get("init"), parent_arch), parent_arch

    def _parent(self, text: str | None, arch: str) -> EncoderInit | None:
        """The init an export or checkpoint records; recorded timm names were checked
        when that run started."""
        return None if text is None else EncoderInit.parse(text, arch, self.key)


def _load(encoder: nn.Module, path: Path, arch: str, in_chans: int) -> None:
    """Load the weights at ``path`` into ``encoder``; any mismatch of architecture, input
    channels, keys or shapes raises first."""
    from pretrain.weights import load_into_encoder, read_encoder_weights

    weights = read_encoder_weights(path)
    if weights.arch and _family(weights.arch) != _family(arch):
        raise EncoderMismatchError(f"{weights.source}: weights are for {weights.arch!r}, "
                                   f"the encoder is {arch!r}: "
                                   f"{_key_report(weights, encoder)}")
    if weights.in_chans and weights.in_chans != in_chans:
        # Exports say what they were trained on: a 3-channel export for a 1-channel
        # encoder is a wrong path, not an ImageNet file to adapt (those say nothing).
        raise EncoderMismatchError(f"{weights.source}: weights are for {weights.in_chans} "
                                   f"input channel(s), the encoder takes {in_chans}: "
                                   f"{_key_report(weights, encoder)}")
    load_into_encoder(encoder, weights)


def _stored_kind(stored: StoredInit | None) -> InitKind:
    """The kind of what a URL holds: from its listing, or for a file from its contents
    (fetched: it is about to be loaded anyway), as for its local form."""
    if stored is None:
        return "unresolved"
    return stored.kind or _path_kind(stored.local())


def _absolute(path: Path) -> str:
    return str(path.resolve())


def _family(name: str) -> str:
    return name.split(".")[0]


def _path_kind(path: Path) -> InitKind:
    if path.is_dir():
        meta = find_backbone_meta(path)
        if meta is None:
            return "unresolved"
        return "export" if meta.parent == path else "run"
    if not path.is_file():
        return "unresolved"
    if path.suffix in (".json", ".safetensors"):
        return "export" if find_backbone_meta(path) is not None else (
            "weights file" if path.suffix == ".safetensors" else "unresolved")
    if _peek_checkpoint(path) is not None:
        return "checkpoint" if _kept_epoch(path) is None else "epoch"
    return "weights file"


def _kept_epoch(path: Path) -> int | None:
    from pretrain.checkpoint import kept_checkpoint_epoch

    return kept_checkpoint_epoch(path)


def _peek_checkpoint(path: Path) -> PretrainCheckpoint | None:
    """The pretraining checkpoint at ``path``, memory-mapped (only its small entries are
    read); None for any other file, whose loading then reports what is wrong."""
    from pretrain.checkpoint_state import read_checkpoint

    try:
        return read_checkpoint(path, mmap=True)
    except ValueError:
        return None


def _key_report(weights: EncoderWeights, model: nn.Module) -> str:
    from pretrain.weights import key_mismatches

    return "; ".join(key_mismatches(model.state_dict(), weights.state_dict)) or "no key differs"


def _hub_id(name: str) -> dict[str, str]:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        return {}
    return {"hub_id": cfg.hf_hub_id} if cfg is not None and cfg.hf_hub_id else {}
