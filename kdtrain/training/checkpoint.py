"""Layout-independent, atomic checkpoints.

Layout on disk::

    <dir>/latest                      name of the newest complete checkpoint ("step_0000100")
    <dir>/step_0000100/meta.json      step, consumed samples, configs, layout, shard files, their
                                      sizes and index (which pieces each file holds)
    <dir>/step_0000100/shards/rank00003.pt   {global param name: piece}, one file per writing rank
    <dir>/step_0000100/rng/rank00003.pt      RNG states of each rank

A *piece* is a rank's local slice of one global parameter plus where it sits: the sharded dimension
and ``(global_start, global_stop, local_start)`` ranges (see models/params.py; pieces.py cuts a
piece into boxes of the global tensor), and its values: ``master`` (fp32) where the optimizer keeps
a master apart from a bf16 parameter, else ``param``; with optimizer state ``exp_avg``,
``exp_avg_sq`` and ``step``. A piece of a sharded (distributed) optimizer may hold only flat
elements ``flat = [start, stop)`` of the rank's local tensor (whose shape ``local_shape`` it
records): its values are then 1-D. Readers of the weights read ``master``, which falls back on
``param`` (checkpoints of earlier versions hold both). Each global parameter is written once:
tensor rank 0 for replicated parameters, the first stage for the tied embedding, and one
data-parallel replica for each element, with its fp32 master weight and Adam moments (with the
distributed optimizer each replica its own chunk; without, the replicas hold the same state and
write balanced shares of it, whole parameters). Loading copies the overlap of every stored piece
with every piece the loading rank needs, whichever file holds it, so a checkpoint written with one
TP/PP/DP layout loads into any other (pretrain with TP=1, distil with a TP=2 teacher, resume a
sharded optimizer with another ``dp`` or unsharded).

meta.json's ``shard_index`` maps each shard file to the headers of its pieces (``{global name:
{global_shape, dim, ranges, [flat, local_shape,] keys}}``, ``keys`` naming the stored values),
gathered from the writing ranks when the save commits. A reader opens a shard file only when a
parameter it is asked for overlaps one of that file's pieces: a rank loads from the few files of
its own stage and tensor slice, not from all of them (an 8B model at TP=8, PP=8, DP=128 with
ZeRO-1 writes one file per rank, 8,192, each of which every rank opened and unpickled before the
index); resuming the distributed optimizer, a rank reads its chunk only, from the file or two that
hold it. Files the index does not describe (every file of a checkpoint written before it existed)
are opened when the reader is made, as they always were.

Atomicity: everything is written under ``step_N.tmp/``; after all ranks finish, the role's first
rank writes meta.json, renames the directory to ``step_N`` and then replaces ``latest``. A crash at
any point leaves ``latest`` on the previous complete checkpoint; so does a crash of the machine:
each rank fsyncs the files it wrote, the first rank the directories before and after the renames.
Saving a step that exists (a resumed run reaching it again) first moves the old copy to
``step_N.old``, which ``latest_checkpoint`` falls back to if the crash comes between the two renames.

A save has three phases (``start_save``): the directory and a host copy of each rank's part, the
rank's files (in a thread while the next step trains, with ``checkpoint.async_save``), and the
commit (``PendingSave.finish``, collective). A failure in any phase on any rank stops every rank
of the role. Loading is checkpoint_load.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ModelConfig, to_dict
from ..durable import fsync_dir, fsync_file, write_synced
from ..models.params import ParamSpec
from ..parallel.groups import raise_together
from .optimizer import AdamWOptimizer, assign_owners
from .pieces import boxes, copy_boxes, overlaps
from .step_dirs import prune_steps, step_name

# 2: some pieces are flat parts (``flat``, ``local_shape``; written by the distributed optimizer).
# A checkpoint without them is written as 1, which readers of either version read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")
HEADER_KEYS = ("global_shape", "dim", "ranges", "flat", "local_shape")  # where a piece sits; the other keys are values


def _format_of(headers) -> int:
    """The format a shard file's or a checkpoint's pieces (or their headers) need."""
    return FORMAT_VERSION if any("flat" in h for h in headers) else 1


def _compact(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """``t`` on the host holding its own values only: ``torch.save`` writes a tensor's whole
    storage, and ``.cpu()`` of a view on the host is the view (a share of a flat master).
    ``copy``: never the training's own tensor (a save written while training goes on)."""
    host = t.detach().cpu()  # a copy for a GPU tensor; a host tensor itself
    shares = host.untyped_storage().nbytes() != host.numel() * host.element_size()
    return host.clone() if shares or (copy and t.device.type == "cpu") else host


def save_checkpoint(root: str | os.PathLike, step: int, params: list[tuple[ParamSpec, torch.nn.Parameter]],
                    optimizer: Optional[AdamWOptimizer], dp_rank: int, role_group, writer_rank: int,
                    meta: dict, keep: int) -> Path:
    """Collective over the role: every rank of it calls with its own parameters."""
    return start_save(root, step, params, optimizer, dp_rank, role_group, writer_rank, meta, keep).finish()


def start_save(root: str | os.PathLike, step: int, params: list[tuple[ParamSpec, torch.nn.Parameter]],
               optimizer: Optional[AdamWOptimizer], dp_rank: int, role_group, writer_rank: int, meta: dict,
               keep: int, background: bool = False) -> "PendingSave":
    """A save's first phase (collective over the role): the step's directory, and a host copy of
    what this rank writes. ``background``: its files are written in a thread while training
    goes on (the copy is then the training's state of this step), and published by ``finish``,
    which every rank of the role calls at the same later point; else ``finish`` writes them."""
    root = Path(root)
    final = root / step_name(step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Each phase's failure on any rank (a full disk, a quota) stops every rank of the role
    # together: a rank that raised alone left the others in the next barrier or gather until the
    # job's timeout. What a failed save leaves is step_N.tmp, which no reader takes for a checkpoint.
    with _together(role_group, final, "prepare"):
        if rank == writer_rank:
            begin_checkpoint(root, step)

    # The replica that writes each element. With the distributed optimizer the owner of its
    # chunk, the one rank holding its master weight and Adam moments. Without, every replica
    # holds the same weights and state: the same balanced assignment over the pieces this
    # position writes shares the host memory, bytes and time of a save among the replicas
    # (data-parallel rank 0 alone would hold and write the whole state while the others wait in
    # the gather below).
    writes = [not (spec.tied_copy or spec.tp_duplicate) for spec, _ in params]
    if optimizer is not None and optimizer.sharded:
        shares = {id(s.param): (s.start, s.stop) for s in optimizer.owned}
        mine = [(spec, p, shares[id(p)]) for (spec, p), w in zip(params, writes) if w and id(p) in shares]
    else:
        dp_group = getattr(optimizer, "dp_group", None)
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        owners = assign_owners([p.numel() if w else 0 for (_, p), w in zip(params, writes)], dp_size)
        mine = [(spec, p, (0, p.numel())) for (spec, p), o, w in zip(params, owners, writes) if w and o == dp_rank]
    with _together(role_group, final, "copy its part of"):
        pieces, rng = _snapshot(mine, optimizer, copy=background)
    save = PendingSave(root, step, final, rank, role_group, writer_rank, meta, keep, pieces, rng)
    if background:
        save.thread = threading.Thread(target=save.write, name=f"checkpoint-{step_name(step)}", daemon=True)
        save.thread.start()
    return save


@dataclasses.dataclass
class PendingSave:
    """A save started (``start_save``): this rank's host copy, its files once written (``write``),
    published by ``finish``."""

    root: Path
    step: int
    final: Path
    rank: int
    role_group: object
    writer_rank: int
    meta: dict
    keep: int
    pieces: dict
    rng: dict
    thread: Optional[threading.Thread] = None
    index: Optional[dict] = None
    error: Optional[BaseException] = None

    def write(self) -> None:
        """This rank's shard file (its pieces, with their optimizer state) and random states; the
        outcome is kept for ``finish`` (this may run in a thread)."""
        tmp = self.root / f"{step_name(self.step)}.tmp"
        try:
            index = {}
            if self.pieces:
                index[f"rank{self.rank:05d}.pt"] = write_shard(tmp, f"rank{self.rank:05d}.pt", self.pieces)
            _save(tmp / "rng" / f"rank{self.rank:05d}.pt", self.rng)
            self.index = index
        except BaseException as e:  # noqa: BLE001 - reported by finish, on every rank
            self.error = e
        finally:
            self.pieces = self.rng = None  # the host copy is on disk (or lost): let it go

    def finish(self) -> Path:
        """Collective over the role: every rank's files are written (this waits for this rank's
        thread), then the committing rank publishes the step. Returns the step's directory."""
        if self.thread is not None:
            self.thread.join()
        elif self.index is None and self.error is None:
            self.write()
        with _together(self.role_group, self.final, "write its part of"):
            if self.error is not None:
                raise self.error
        # Every rank sends the headers of what it wrote to the committing rank once its files are
        # written and synced, so the gather is also the barrier before the commit: meta.json's
        # index is learnt without opening a single shard file.
        index = _gather_index(self.index, self.role_group, self.writer_rank)
        with _together(self.role_group, self.final, "commit"):
            if self.rank == self.writer_rank:
                commit_checkpoint(self.root, self.step, self.meta, self.keep, index)
        return self.final


@contextlib.contextmanager
def _together(group, final: Path, what: str):
    """Run the block on every rank of ``group``, then agree: every rank raises when the block
    raised on any (``raise_together``; it is also the phase's barrier)."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - any failure: the peers must not wait for this rank
        error = e
    raise_together(error, group, lambda r, shown: f"rank {r} could not {what} checkpoint {final}: {shown}")


def _snapshot(mine: list, optimizer: Optional[AdamWOptimizer], copy: bool) -> tuple[dict, dict]:
    """(pieces, random states) this rank writes, on the host: the pieces ``mine`` with their
    optimizer state; ``copy``: none of them the training's own tensors."""
    pieces = {}
    for spec, p, (start, stop) in mine:
        piece = {"global_shape": list(spec.global_shape), "dim": spec.dim, "ranges": spec.ranges()}
        whole = start == 0 and stop == p.numel()
        if not whole:
            piece.update(flat=[start, stop], local_shape=list(p.shape))
        if optimizer is not None:
            piece.update({k: _compact(v, copy) for k, v in optimizer.state_for(spec).items()})
        if "master" not in piece:  # else the (bf16) parameter is the master rounded: not stored
            piece["param"] = _compact(p if whole else p.detach().reshape(-1)[start:stop], copy)
        pieces[spec.global_name] = piece
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return pieces, rng


def _gather_index(index: dict, group, dst: int) -> dict:
    """The union of every rank's ``{shard file: headers}`` at global rank ``dst`` (the others get
    their own back). Collective over ``group``; returns at ``dst`` after every rank has called it."""
    if not dist.is_initialized():
        return index
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(index, parts, dst=dst, group=group)
    if parts is None:
        return index
    merged = {}
    for part in parts:
        assert not merged.keys() & part.keys(), sorted(merged.keys() & part.keys())  # one writer per file
        merged.update(part)
    return merged


def begin_checkpoint(root: str | os.PathLike, step: int) -> Path:
    """Create the empty ``step_N.tmp`` directory that a save fills (one writer); returns it."""
    tmp = Path(root) / f"{step_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crash
    (tmp / "shards").mkdir(parents=True)
    (tmp / "rng").mkdir()
    return tmp


def write_shard(tmp: Path, fname: str, pieces: dict) -> dict[str, dict]:
    """One shard file ``{global name: piece}`` of the checkpoint being written in ``tmp``; returns
    its entry of meta.json's index (``{global name: header}``), which the commit records."""
    _save(tmp / "shards" / fname, {"version": _format_of(pieces.values()), "pieces": pieces})
    return {name: piece_header(piece) for name, piece in pieces.items()}


def _save(path: Path, value) -> None:
    """``torch.save`` and sync one file of a checkpoint being written. A full disk surfaced as
    torch's "unexpected pos 833088 vs 832976" from its zip writer: named here, with the space left."""
    try:
        torch.save(value, path)
        fsync_file(path)
    except (OSError, RuntimeError) as e:
        try:
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "its free space unknown"
        raise OSError(f"cannot write checkpoint file {path} ({free}; full disk or quota?): "
                      f"{str(e).strip().splitlines()[0][:200]}") from e


def piece_header(piece: dict) -> dict:
    """Where a piece sits and which values it stores, without the values (the index's entry)."""
    header = {"global_shape": list(piece["global_shape"]), "dim": piece["dim"],
              "ranges": [list(r) for r in piece["ranges"]], "keys": sorted(k for k in piece if k not in HEADER_KEYS)}
    if "flat" in piece:
        header.update(flat=list(piece["flat"]), local_shape=list(piece["local_shape"]))
    return header


def commit_checkpoint(root: str | os.PathLike, step: int, meta: dict, keep: int, index: dict[str, dict]) -> Path:
    """Publish a filled ``step_N.tmp``: write meta.json, rename it to ``step_N``, point ``latest``
    at it and prune (one writer, after every shard is on disk). ``index``: what each shard file
    holds, ``{file name: write_shard's return}`` from every writer."""
    root = Path(root)
    name = step_name(step)
    tmp, final = root / f"{name}.tmp", root / name
    files = sorted((tmp / "shards").glob("*.pt"))
    assert sorted(index) == [f.name for f in files], (sorted(index), [f.name for f in files])
    meta = dict(meta, version=_format_of(h for f in files for h in index[f.name].values()), step=step,
                shard_files=[f.name for f in files],
                shard_bytes={f.name: f.stat().st_size for f in files}, saved_at=time.time(),
                shard_index={f.name: index[f.name] for f in files})
    # The files are synced by the ranks that wrote them; their names (and meta.json's) are synced
    # here, and each rename before the next, so that ``latest`` never reaches the disk first.
    for d in ("shards", "rng"):
        fsync_dir(tmp / d)
    write_synced(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
    fsync_dir(tmp)
    aside = root / f"{name}.old"
    if final.exists():
        # Re-saving a step (a resumed run reaching it again): the complete copy is moved aside,
        # not deleted, so a crash before the next rename leaves it where latest_checkpoint
        # looks when ``latest`` names a missing step.
        if aside.exists():
            shutil.rmtree(aside)  # stale: ``final`` is complete
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(root)
    write_synced(root / "latest.tmp", name)
    os.replace(root / "latest.tmp", root / "latest")
    fsync_dir(root)
    prune_steps(root, keep)  # also removes the set-aside copy
    return final


def write_global_checkpoint(out: str | os.PathLike, model: ModelConfig, names, tensor, meta: dict,
                            shard_bytes: int) -> Path:
    """Step 0 of a checkpoint under ``out`` holding whole (unsharded) parameters, written by one
    process in order: ``tensor(name)`` is called once per name and the results go to shard files
    of about ``shard_bytes`` (host memory: one shard plus one tensor). For converters (Hugging
    Face import, pruning); atomic like every save. Returns the step directory."""
    if shard_bytes <= 0:
        raise ValueError(f"shard size must be positive, got {shard_bytes}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory (the checkpoint directory goes there)")
    others = sorted(p.name for p in out.glob("step_*") if p.is_dir() and not p.name.startswith(step_name(0)))
    if others:  # writing here would prune a run's checkpoints
        raise ValueError(f"{out} holds other checkpoints ({others[0]}, ...); write to a new directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = begin_checkpoint(out, 0)
    try:
        index = _write_global_shards(tmp, names, tensor, shard_bytes)
    except BaseException:  # a bad source tensor (ValueError) or an interrupt: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    meta = {"model": to_dict(model), "layout": {"tp": 1, "pp": 1, "dp": 1, "rank_offset": 0},
            "consumed_samples": 0, **meta}
    return commit_checkpoint(out, 0, meta, keep=1, index=index)


def _write_global_shards(tmp: Path, names, tensor, shard_bytes: int) -> dict[str, dict]:
    part: dict[str, dict] = {}
    index: dict[str, dict] = {}
    size = nfiles = 0
    for key in names:
        t = tensor(key).contiguous()
        # One piece covering the whole parameter: what a TP=1 rank holding it would write.
        spec = ParamSpec(local_name=key, global_name=key, global_shape=tuple(t.shape), shard_dim=None, chunks=1,
                         is_vocab=False, tp_rank=0, tp_size=1, local_shape=tuple(t.shape))
        part[key] = {"global_shape": list(t.shape), "dim": spec.dim, "ranges": spec.ranges(), "param": t}
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            index[f"part{nfiles:05d}.pt"] = write_shard(tmp, f"part{nfiles:05d}.pt", part)
            part, size, nfiles = {}, 0, nfiles + 1
    if part:
        index[f"part{nfiles:05d}.pt"] = write_shard(tmp, f"part{nfiles:05d}.pt", part)
    return index


# The fields of meta.json that readers index into, with their types (the rest are compared, not used).
_META_FIELDS = {"step": int, "shard_files": list, "model": dict, "shard_index": dict, "shard_bytes": dict,
                "layout": dict}
_KINDS = {int: "a whole number", list: "a JSON array", dict: "a JSON object"}


def _check_meta(meta, meta_file: Path) -> None:
    """A meta.json that parses but was edited or written by something else: named here, not met as
    a KeyError or AttributeError deep inside a load."""
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint metadata {meta_file}: a JSON object was expected, got "
                         f"{type(meta).__name__}")
    if meta.get("version") not in READABLE_VERSIONS:  # first: another format may lack what this one has
        raise ValueError(f"{meta_file}: checkpoint format {meta.get('version')} is not one this version of "
                         f"kdtrain reads ({', '.join(map(str, READABLE_VERSIONS))})")
    for key in ("step", "shard_files"):
        if key not in meta:
            raise ValueError(f"corrupt checkpoint metadata {meta_file}: no {key!r}")
    for key, kind in _META_FIELDS.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ValueError(f"corrupt checkpoint metadata {meta_file}: {key!r} is {value!r}, not "
                             f"{_KINDS[kind]}")
    if not all(isinstance(f, str) for f in meta["shard_files"]):
        raise ValueError(f"corrupt checkpoint metadata {meta_file}: 'shard_files' must list file names")


class CheckpointReader:
    """Index of the pieces of one checkpoint; copies any parameter into any layout.

    A shard file is opened (memory-mapped) the first time a piece of it is needed; meta.json's
    index says which pieces each file holds. Files it does not describe are opened here."""

    def __init__(self, path: str | os.PathLike, share: tuple[int, int] = (0, 1)):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise ValueError(f"not a kdtrain checkpoint (no meta.json): {self.path}")
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt checkpoint metadata {meta_file}: {e}") from None
        _check_meta(self.meta, meta_file)
        self._files: dict[str, dict] = {}  # file name -> {global name: piece}, of the files opened
        # Each global parameter's pieces, in file order: (file name, header).
        self._where: dict[str, list[tuple[str, dict]]] = {}
        index = self.meta.get("shard_index") or {}  # absent in checkpoints of earlier versions
        i, n = share
        for j, fname in enumerate(self.meta["shard_files"]):
            # Every listed file is there with its size (one stat each): a damaged checkpoint is
            # refused before any load writes anything (an export), and on every rank alike, not by
            # the ranks that happen to need the file while the others go on. The ranks of a role
            # loading together each check a ``share`` (files[i::n]; every rank checking every
            # file was ranks x files stats, 67M for 8192 ranks, on one metadata server) and
            # agree on the outcome (raise_together); a file is checked again when opened.
            if j % n == i:
                self._check_file(fname)
            headers = index.get(fname)
            if headers is None:
                headers = {gname: piece_header(piece) for gname, piece in self._open(fname).items()}
            for gname, header in headers.items():
                self._where.setdefault(gname, []).append((fname, header))

    def _check_file(self, fname: str) -> Path:
        f = self.path / "shards" / fname
        if not f.is_file():
            raise ValueError(f"checkpoint shard {f} is missing (meta.json lists it): the checkpoint was copied "
                             "or moved incompletely")
        sizes = self.meta.get("shard_bytes", {})  # absent in checkpoints of earlier versions
        if fname in sizes and f.stat().st_size != sizes[fname]:
            raise ValueError(f"checkpoint shard {f} has {f.stat().st_size} bytes, meta.json records "
                             f"{sizes[fname]}: the file is truncated or was replaced (an interrupted copy?)")
        return f

    def _open(self, fname: str) -> dict:
        """``{global name: piece}`` of shard file ``fname``, loaded on first use."""
        if fname in self._files:
            return self._files[fname]
        f = self._check_file(fname)
        try:
            data = torch.load(f, mmap=True, weights_only=True, map_location="cpu")
        except Exception as e:  # truncated or corrupt file
            raise ValueError(f"cannot read checkpoint shard {f}: {e}") from None
        self._files[fname] = data["pieces"]
        return data["pieces"]

    def _piece(self, gname: str, fname: str) -> dict:
        piece = self._open(fname).get(gname)
        if piece is None:
            raise ValueError(f"checkpoint {self.path}: meta.json places a piece of {gname} in shard {fname}, which "
                             "has none (the file was replaced?)")
        return piece

    @property
    def pieces(self) -> dict[str, list[dict]]:
        """Every stored piece by global name. Opens every shard file: for inspecting a checkpoint."""
        return {gname: [self._piece(gname, f) for f, _ in where] for gname, where in self._where.items()}

    def names(self) -> set[str]:
        return set(self._where)

    def has_optimizer_state(self) -> bool:
        return any("exp_avg" in h["keys"] for where in self._where.values() for _, h in where)

    def read_into(self, spec: ParamSpec, key: str, out: torch.Tensor,
                  flat: Optional[tuple[int, int]] = None) -> None:
        """Fill ``out`` (this rank's local tensor for ``spec``) with ``key`` of the stored pieces;
        with ``flat = (start, stop)``, ``out`` is 1-D and gets only those flat elements of it (a
        distributed optimizer's share; ``out``'s vocabulary padding, if any, is left as it was)."""
        if spec.global_name not in self._where:
            raise ValueError(f"checkpoint {self.path} has no parameter {spec.global_name!r}")
        copied = 0
        want = {"dim": spec.dim, "ranges": spec.ranges()}
        if flat is not None:
            want.update(flat=list(flat), local_shape=list(spec.local_shape))
        mine = boxes(want, out)
        for fname, header in self._where[spec.global_name]:
            if tuple(header["global_shape"]) != spec.global_shape:
                raise ValueError(f"checkpoint {self.path}: {spec.global_name} has shape "
                                 f"{tuple(header['global_shape'])}, the model expects {spec.global_shape} "
                                 "(different model config?)")
            if not overlaps(boxes(header), mine):
                continue  # none of this rank's values: its file stays closed
            piece = self._piece(spec.global_name, fname)
            src = piece.get(key)
            if src is None and key == "master":
                src = piece["param"]
            if src is None:
                raise ValueError(f"checkpoint {self.path}: {spec.global_name} has no {key!r} (saved without optimizer state?)")
            copied += copy_boxes(boxes(piece, src), mine)
        # Pieces skipped above copy nothing either way: a piece missing from the files still
        # leaves ``copied`` short here. (Stored pieces never overlap: each element has one writer.)
        expected = sum(math.prod(h - lo for lo, h in zip(glo, ghi)) for glo, ghi, _ in mine)
        if copied != expected:
            raise ValueError(f"checkpoint {self.path}: {spec.global_name} is incomplete "
                             f"({copied} of {expected} values found; a shard file is missing?)")
        if key == "master":  # the weights: a NaN would reach every loss of a run that loads them
            from ..convert.hf_weights import is_finite  # convert imports this module

            if not is_finite(out):
                raise ValueError(f"checkpoint {self.path}: {spec.global_name} holds NaN or infinite weights "
                                 "(saved from a run that diverged, or a damaged file)")

    def read_step_state(self, spec: ParamSpec) -> torch.Tensor:
        """Adam's step count of ``spec`` (every piece holds it), from a file already open if one holds it."""
        where = self._where[spec.global_name]
        fname = next((f for f, _ in where if f in self._files), where[0][0])
        return self._piece(spec.global_name, fname)["step"]
