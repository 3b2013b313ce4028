"""A zoo folder's manifest, zoo.json: which architecture factory rebuilds its
members (with its keyword arguments), where its checkpoints and metadata
table are, and the settings that made it. zoo.generator writes one; a
user's own zoo can carry the same file; zoo.analyze reads it
(manifest_defaults) so that `spectral-ext zoo OUT` needs no other argument."""
from __future__ import annotations

import functools
import json
import os
import pathlib

from ._base import ZooError
from .members import resolve_arch

MANIFEST = "zoo.json"
FORMAT = "spectral_ext.zoo/1"
# Factories of this package a manifest may name without trust: importing them runs no code from the zoo's author.
TRUSTED_ARCHS = frozenset({"spectral_ext.zoo.generator:small_cnn", "spectral_ext.datasets:digits_cnn",
                           "spectral_ext.datasets:digits_mlp"})
# Zoos made before 0.2.0 name the factory by its former module; it is the same function.
_MOVED_ARCHS = {"spectral_ext.zoo_generator:small_cnn": "spectral_ext.zoo.generator:small_cnn"}


def read_manifest(folder) -> dict | None:
    """The manifest of a zoo folder, or None when it has none.

    Reading it imports and runs nothing (see manifest_defaults). A factory
    named by its module before 0.2.0 (spectral_ext.zoo_generator) is read as
    its present name.

    Args:
        folder: the zoo folder (a path).

    Returns:
        The manifest as a dict, {"arch": "module:function" or a torchvision
        name, "arch_kwargs": {...}, "checkpoints": a folder relative to it,
        "metadata": a table relative to it, ...}, or None. A manifest that is
        not valid JSON or lacks "arch" raises ValueError.
    """
    path = pathlib.Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arch"), str):
        raise ValueError(f"{path} must be a JSON object with at least 'arch' ('package.module:function')")
    if not isinstance(manifest.get("arch_kwargs") or {}, dict):
        raise ValueError(f"{path}: arch_kwargs must be a JSON object of keyword arguments, got "
                         f"{manifest['arch_kwargs']!r}")
    manifest["arch"] = _MOVED_ARCHS.get(manifest["arch"], manifest["arch"])
    return manifest


def write_manifest(folder, manifest: dict) -> None:
    """Write `manifest` as the folder's zoo.json, atomically (a reader sees
    the old file or the new one, never a part).

    Args:
        folder: the zoo folder (a path); it must exist.
        manifest: the JSON-serialisable manifest.
    """
    folder = pathlib.Path(folder)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)


def manifest_defaults(source, arch=None, metadata=None, trust_manifest: bool = False) -> tuple:
    """What a zoo folder's manifest gives zoo.analyze where its caller gave
    nothing.

    A folder holding zoo.json gives its checkpoints folder, its factory
    (with arch_kwargs) where arch is None and its metadata table where
    metadata is None; anything else is returned unchanged. A manifest comes
    with the folder, from whoever made it: its arch is used when it is a
    torchvision model name or one of TRUSTED_ARCHS; any other
    'module:function' would import and call code it names (os:abort kills
    the run), so it needs trust_manifest=True (--trust-manifest) or the
    architecture given as arch (--arch), else a ZooError saying so.

    Args:
        source: zoo.analyze's source (a folder, or anything else it takes).
        arch: the architecture the caller gave, or None.
        metadata: the metadata table the caller gave, or None.
        trust_manifest: import and run a factory the manifest names outside
            TRUSTED_ARCHS.

    Returns:
        (source, arch, metadata), with the manifest's values filled in.
    """
    if not isinstance(source, (str, os.PathLike)) or not pathlib.Path(source).is_dir():
        return source, arch, metadata
    root = pathlib.Path(source)
    try:
        manifest = read_manifest(root)
    except ValueError as error:
        raise ZooError(str(error)) from error
    if manifest is None:
        return source, arch, metadata
    if arch is None:
        named = manifest["arch"]
        if ":" in named and named not in TRUSTED_ARCHS and not trust_manifest:
            raise ZooError(f"{root / MANIFEST} names the architecture {named!r}, code it would import and run: "
                           f"give it as arch (--arch {named}) or trust the manifest (trust_manifest=True, "
                           "--trust-manifest) if you trust this folder")
        factory, kwargs = resolve_arch(named), manifest.get("arch_kwargs") or {}
        arch = functools.partial(factory, **kwargs) if kwargs else factory
    if metadata is None and manifest.get("metadata"):
        metadata = root / manifest["metadata"]
    return root / manifest.get("checkpoints", "."), arch, metadata
