"""Golden fixtures: write, read (verified), and compare against a candidate.

A fixture is a folder (DESIGN.md section 5)::

    FIXTURE/
      manifest.json         format version, arch, preset, config, seed, dtype,
                            refssm version, tolerances, loss, and for every
                            tensor: name, role, shape, dtype, sha256
      tensors.safetensors   every tensor, by name; its header's metadata holds
                            ``manifest_sha256``, the sha256 of manifest.json's bytes

Tensor names: model parameters are flattened as ``layer.name`` (exactly the
Axon layer and parameter names, so splitting each such key on ``.`` rebuilds
an Axon ``ModelState`` with no key mapping). Every other tensor has a ``/`` in
its name and so can never be mistaken for a parameter: ``input/x``,
``output/last``, ``output/sequence``, ``step/output``, ``cache/...``,
``grad/input/x``, ``grad/<layer>.<name>``, ``core/...``.

Reading never unpickles (safetensors only holds raw little-endian buffers and
JSON); a hash mismatch, a missing or extra tensor, a wrong shape or dtype, an
unknown format version, a malformed manifest, or a manifest whose sha256 is not
the one its tensor file records is a :class:`FixtureError`. The last one binds
the two files: the tensor hashes alone would not notice loosened tolerances, an
edited config, or a tensor dropped from both files.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .._text import text_table
from ..verify.metrics import reference_scale

__all__ = ["FORMAT_VERSION", "FixtureError", "Fixture", "write_fixture", "read_fixture",
           "compare_tensors", "CompareRow", "format_compare", "tensor_role", "check_callable"]

#: Bumped whenever the layout of manifest.json or the tensor naming changes
#: (2: the tensor file's metadata records the manifest's sha256).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"


class FixtureError(ValueError):
    """A fixture (or a candidate) that cannot be trusted: says what and where."""


def tensor_role(name: str) -> str:
    """``"param"`` for ``layer.name`` keys, else the prefix before the first ``/``.

    Examples
    --------
    >>> tensor_role("mamba_block_1_in_proj.kernel"), tensor_role("grad/input/x")
    ('param', 'grad')
    """
    return name.split("/", 1)[0] if "/" in name else "param"


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _manifest_text(manifest: dict) -> bytes:
    """The canonical bytes of a manifest: what :func:`write_fixture` writes and what its
    recorded sha256 covers (so a copy whose line endings git changed still verifies)."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _write_bytes(file, data: bytes) -> None:
    """Write ``data`` with the process's umask (``safetensors.save_file`` makes 0600 files)."""
    with open(file, "wb") as fh:
        fh.write(data)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


@dataclass
class Fixture:
    """A fixture in memory: its manifest (a dict) and its tensors by name."""

    manifest: dict
    tensors: dict = field(default_factory=dict)

    def params(self) -> dict:
        """The parameter tree ``{layer: {name: array}}`` rebuilt by splitting on ``.``."""
        tree: dict = {}
        for key, arr in self.tensors.items():
            if tensor_role(key) == "param":
                layer, name = key.rsplit(".", 1)
                tree.setdefault(layer, {})[name] = arr
        return tree


def write_fixture(path, *, arch: str, preset: str, config: dict, seed: int, dtype: str,
                  tensors: dict, tolerances: dict, loss: str = "", notes: str = "") -> str:
    """Write ``path/manifest.json`` and ``path/tensors.safetensors``; returns ``path``.

    Same arguments -> byte-identical files (sorted keys, no timestamps).

    Parameters
    ----------
    path : str or os.PathLike
        Folder to create (may exist).
    arch, preset : str
    config : dict
        The full configuration (JSON-serialisable).
    seed : int
    dtype : str
        ``"float64"`` or ``"float32"``.
    tensors : dict of str -> ndarray
    tolerances : dict
        Per role or per tensor name: ``{"output": 1e-12, "grad": 1e-10, ...}``.
    loss : str
        The scalar loss the ``grad/`` tensors differentiate.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> _ = write_fixture(d, arch="core", preset="-", config={}, seed=0, dtype="float64",
    ...                   tensors={"input/x": np.arange(3.0)}, tolerances={"input": 0.0})
    >>> read_fixture(d).tensors["input/x"]
    array([0., 1., 2.])
    """
    from safetensors.numpy import save

    from .. import __version__

    os.makedirs(path, exist_ok=True)
    clean = {}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.kind not in "fiu":
            raise FixtureError(f"tensor {name!r}: expected a real numeric array, got {arr.dtype}")
        clean[name] = arr
    entries = [{"name": n, "role": tensor_role(n), "shape": list(a.shape), "dtype": str(a.dtype),
                "sha256": _sha256(a)} for n, a in clean.items()]
    manifest = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "preset": preset,
        "config": _jsonable(config),
        "seed": int(seed),
        "dtype": dtype,
        "refssm_version": __version__,
        "tolerances": _jsonable(tolerances),
        "loss": loss,
        "notes": notes,
        "tensors": entries,
    }
    _check_manifest(manifest, "write_fixture")       # never write what read_fixture refuses
    text = _manifest_text(manifest)
    _write_bytes(os.path.join(path, MANIFEST), text)
    meta = {"manifest_sha256": hashlib.sha256(text).hexdigest()}
    _write_bytes(os.path.join(path, TENSORS), save(clean, metadata=meta))
    return str(path)


def _load_safetensors(file) -> tuple:
    """``(tensors, header metadata or {})`` of a safetensors file."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    try:
        with safe_open(file, framework="np") as fh:
            meta = fh.metadata() or {}
        return load_file(file), meta
    except Exception as exc:  # safetensors raises its own error types
        raise FixtureError(f"{file}: not a readable safetensors file ({exc})") from exc


_ENTRY_KEYS = {"name": str, "role": str, "shape": list, "dtype": str, "sha256": str}


def _check_manifest(m, mpath) -> None:
    """The structure of a manifest ``m`` (a dict): what each field must be, said when it
    is not."""
    def bad(what, got):
        raise FixtureError(f"{mpath}: expected {what}, got {got!r}"[:400])

    for key, typ in (("arch", str), ("preset", str), ("config", dict), ("seed", int),
                     ("dtype", str), ("tolerances", dict), ("tensors", list)):
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            bad(f"{key!r}: a {typ.__name__}", m.get(key, "nothing"))
    for key, tol in m["tolerances"].items():
        try:
            ok = (isinstance(tol, (int, float)) and not isinstance(tol, bool)
                  and 0.0 <= float(tol) < float("inf"))
        except OverflowError:                       # an int beyond float64
            ok = False
        if not ok:
            bad(f"tolerance {key!r}: a finite number >= 0", tol)
    for i, e in enumerate(m["tensors"]):
        if not isinstance(e, dict):
            bad(f"tensors[{i}]: an object", e)
        for key, typ in _ENTRY_KEYS.items():
            if not isinstance(e.get(key), typ):
                bad(f"tensors[{i}].{key}: a {typ.__name__}", e.get(key, "nothing"))
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                   for n in e["shape"]):
            bad(f"tensors[{i}].shape: non-negative integers", e["shape"])
        if e["role"] != tensor_role(e["name"]):
            bad(f"tensors[{i}].role {tensor_role(e['name'])!r} (from its name)", e["role"])


def read_fixture(path) -> Fixture:
    """Read a fixture folder and verify every tensor against its manifest entry.

    Raises
    ------
    FixtureError
        Missing files, unknown format version, a tensor missing or not listed,
        a wrong shape or dtype, or a sha256 mismatch (tampered or corrupt).
    """
    mpath = os.path.join(path, MANIFEST)
    tpath = os.path.join(path, TENSORS)
    for p in (mpath, tpath):
        if not os.path.isfile(p):
            raise FixtureError(f"fixture {path}: expected file {os.path.basename(p)}, not found")
    with open(mpath, "rb") as fh:
        text = fh.read()
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FixtureError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise FixtureError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = (": format 1 fixtures (before the manifest's sha256) must be written again with "
                "refssm golden" if version == 1 else "")
        raise FixtureError(f"{mpath}: expected format_version {FORMAT_VERSION}, got "
                           f"{version!r}{hint}")
    _check_manifest(manifest, mpath)
    tensors, meta = _load_safetensors(tpath)
    listed = {e["name"]: e for e in manifest["tensors"]}
    missing = sorted(set(listed) - set(tensors))
    extra = sorted(set(tensors) - set(listed))
    if missing:
        raise FixtureError(f"{path}: tensors listed in the manifest but missing: {missing}")
    if extra:
        raise FixtureError(f"{path}: tensors not listed in the manifest: {extra}")
    for name, e in listed.items():
        arr = tensors[name]
        if list(arr.shape) != list(e["shape"]):
            raise FixtureError(f"{name}: expected shape {tuple(e['shape'])}, got {arr.shape}")
        if str(arr.dtype) != e["dtype"]:
            raise FixtureError(f"{name}: expected dtype {e['dtype']}, got {arr.dtype}")
        digest = _sha256(arr)
        if digest != e["sha256"]:
            raise FixtureError(f"{name}: sha256 mismatch (expected {e['sha256'][:16]}..., got "
                               f"{digest[:16]}...): the file was changed after it was written")
    recorded = meta.get("manifest_sha256")
    if recorded is None:
        raise FixtureError(f"{tpath}: expected the manifest's sha256 in its header metadata "
                           f"(manifest_sha256, format 2), got none: written by another tool, or "
                           f"rewritten after refssm wrote it")
    digest = hashlib.sha256(_manifest_text(manifest)).hexdigest()
    if recorded != digest:
        raise FixtureError(
            f"{mpath}: expected the sha256 that {TENSORS} records for it, "
            f"{recorded[:16]}..., got {digest[:16]}...: the manifest (tolerances, config, "
            f"tensor list) was changed after it was written, or the files are from two fixtures")
    return Fixture(manifest, tensors)


@dataclass
class CompareRow:
    """One tensor of a comparison."""

    name: str
    max_abs: float
    rel: float
    tolerance: float
    ok: bool
    note: str = ""


def _tolerance(manifest: dict, name: str) -> float:
    tol = manifest.get("tolerances", {})
    if name in tol:
        return float(tol[name])
    return float(tol.get(tensor_role(name), tol.get("default", 0.0)))


def compare_tensors(fixture: Fixture, candidate: dict, *, roles=("output", "step", "cache",
                                                                  "grad", "core")) -> list:
    """Compare a candidate's tensors with the fixture's, tensor by tensor.

    Only tensors whose role is in ``roles`` are compared (inputs and parameters
    are what the candidate was given). A tensor the fixture has but the
    candidate lacks fails; a wrong shape fails.

    Returns
    -------
    list of CompareRow
        ``rel`` is the normwise relative error ``max|a - b| / max|b|``; for a
        tensor whose reference is a structural zero the denominator is the
        largest ``max|b|`` of its role instead
        (:func:`refssm.verify.metrics.reference_scale`).
    """
    rows = []
    role_scale = {}
    for name, ref in fixture.tensors.items():
        if ref.size:
            role = tensor_role(name)
            role_scale[role] = max(role_scale.get(role, 0.0), float(np.abs(ref).max()))
    for name in sorted(fixture.tensors):
        if tensor_role(name) not in roles:
            continue
        ref = fixture.tensors[name]
        tol = _tolerance(fixture.manifest, name)
        if name not in candidate:
            rows.append(CompareRow(name, float("nan"), float("nan"), tol, False, "missing"))
            continue
        got = np.asarray(candidate[name])
        if got.shape != ref.shape:
            rows.append(CompareRow(name, float("nan"), float("nan"), tol, False,
                                   f"shape {got.shape}, expected {ref.shape}"))
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = reference_scale(ref, role_scale.get(tensor_role(name), 0.0))
        rel = max_abs / max(scale, np.finfo(np.float64).tiny)
        finite = bool(np.isfinite(got).all())
        rows.append(CompareRow(name, max_abs, rel, tol, finite and rel <= tol,
                               "" if finite else "non-finite values"))
    return rows


def format_compare(rows) -> str:
    """A per-tensor table: max abs, normwise relative, tolerance, ok."""
    head = ("tensor", "max abs", "rel", "tol", "ok")
    table = [head] + [(r.name, f"{r.max_abs:.2e}", f"{r.rel:.2e}", f"{r.tolerance:.0e}",
                       ("ok" if r.ok else "FAIL") + (f" ({r.note})" if r.note else ""))
                      for r in rows]
    lines = text_table(table, right={1, 2, 3})
    bad = sum(not r.ok for r in rows)
    lines.append(f"\n{len(rows)} tensors compared, {len(rows) - bad} within tolerance, "
                 f"{bad} failed")
    return "\n".join(lines)


def check_callable(fixture_path, fn, *, roles=("output", "step", "cache", "grad", "core")):
    """Point the oracle at another implementation given as a Python callable.

    ``fn(inputs, params, manifest)`` receives the fixture's ``input/`` tensors
    (keys without the prefix), its parameter tree ``{layer: {name: array}}``
    and its manifest (config, dtype, loss), and returns a dict of tensors named
    as in the fixture (``"output/sequence"``, ``"grad/input/x"``, ...); whatever
    it returns is compared, and every fixture tensor of ``roles`` it does not
    return counts as missing.

    Returns
    -------
    list of CompareRow
        Print them with :func:`format_compare`.

    Examples
    --------
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> x = np.arange(4.0)
    >>> _ = write_fixture(d, arch="core", preset="-", config={}, seed=0, dtype="float64",
    ...                   tensors={"input/x": x, "output/y": 2 * x}, tolerances={"output": 1e-12})
    >>> [r.ok for r in check_callable(d, lambda inp, p, m: {"output/y": inp["x"] * 2})]
    [True]
    >>> [r.ok for r in check_callable(d, lambda inp, p, m: {"output/y": inp["x"] * 2.001})]
    [False]
    """
    fx = read_fixture(fixture_path)
    inputs = {k.split("/", 1)[1]: v for k, v in fx.tensors.items() if tensor_role(k) == "input"}
    got = fn(inputs, fx.params(), fx.manifest)
    if not isinstance(got, dict):
        raise FixtureError(f"check_callable: expected the callable to return a dict of tensors, "
                           f"got {type(got).__name__}")
    return compare_tensors(fx, got, roles=roles)
