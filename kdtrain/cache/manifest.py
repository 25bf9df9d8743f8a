"""The cache manifest: what the cache was computed from, its record layout and its shards.

``manifest.json`` in the cache directory::

    format, version, complete
    teacher:    model config, checkpoint path, a digest of its weight files and their [file, size,
                mtime_ns] (or the random-init seed), compute dtype; ``weights_hash`` "files":
                the digest is the sha256 of the files' names and own sha256s (absent in
                manifests of earlier versions: the sha256 of the files' names and bytes in turn)
    tokenizer:  path and fingerprint (sha256[:16] of the model file, as in the dataset metadata)
    dataset:    per prefix: path, .bin size, sha256 of the .idx and its [size, mtime_ns] (not
                content: lets a run skip hashing an unchanged file); shuffling seed, split
                (together they fix which window train sample g is); or mock + seed
    seq_length, vocab_size, k, tau, values_dtype, shard_samples, num_samples
    positions:  "all" (every position, fixed-size records) or "targets" (only where the label is a
                target, variable-size records; the dataset section then also holds the sha256 and
                [size, mtime_ns] of each corpus' loss mask and whether the run uses it)
    layout:     record bytes, id bits, field offsets (codec.RecordLayout / TargetRecordLayout)
    shards:     [{file, first_sample, num_samples, bytes, crc32}, ...] (crc32: the shard header's
                checksum field: of the shard's tables from version 3, of its whole body before)
    identity:   sha256 of the content-defining fields (no paths), also stamped into every shard
    job:        informational (teacher TP/PP/DP, micro-batch); not part of the identity

The file is written atomically (temp + fsync + rename) and holds no timestamps of its own (only
the corpus and weight files' mtimes), so two runs of the same job on the same files produce byte-identical
manifests. ``check_against(run)`` compares it with a
distillation run config and raises a ``ValueError`` naming the first mismatching field.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import DataConfig, ModelConfig, to_dict
from ..data.tokenizer import tokenizer_file
from ..data.indexed import loss_mask_path
from ..durable import fsync_dir, write_synced
from .codec import RecordLayout, TargetRecordLayout
from .shard import ShardIndex, ShardInfo

POSITIONS = ("all", "targets")

FORMAT = "kdtrain-topk-cache"
# 2: each token stores the logsumexp of the teacher's logits outside its top-k (version 1 stored
# the full log-normaliser, from which a confident teacher's tail cannot be recovered).
# 3: shards carry a checksum per record (shard format 2), so a reader checks what it reads
# instead of the whole shard first; records and manifest fields are those of version 2.
VERSION = 3
# Cache format -> the shard format its shards have. Version 2 caches are still read (each shard
# verified whole on first use, as when they were written); jobs write the current version only.
SHARD_VERSIONS = {2: 1, 3: 2}
MANIFEST = "manifest.json"
_HASH_CHUNK = 16 << 20


def sha256_file(path: str | os.PathLike, h=None) -> str:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_identity(path: Optional[str]) -> Optional[dict]:
    """Path and fingerprint of a tokenizer (the fingerprint the dataset metadata uses: the sha256 of
    its SentencePiece model file or Hugging Face tokenizer.json, kdtrain/data/tokenizer.py)."""
    if not path:
        return None
    try:
        f = tokenizer_file(path)
    except ValueError as e:
        raise ValueError(f"data.tokenizer: {e}") from None
    return {"path": str(path), "fingerprint": sha256_file(f)[:16]}


# Digests this process has taken, by (device, inode, size, mtime_ns, ctime_ns) of a corpus file,
# or a tuple of those for a teacher's weight files: a process checks a cache against its run
# more than once (a mixed run's rank 0 twice), and a .idx of 1e8 documents is 2 GB, a loss mask
# of 1e11 tokens 12.5 GB, a 70B teacher 140 GB.
_DIGESTS: dict[tuple, str] = {}
# Entries that describe the files on disk, not their content (corpus_file_digest, teacher_weights).
_STAT_KEYS = ("idx_stat", "loss_mask_stat", "weights_stat")


def corpus_file_digest(path: Path, recorded: tuple[Optional[str], Optional[list]] = (None, None)
                       ) -> tuple[str, list[int]]:
    """(sha256, [size, mtime_ns]) of a corpus file (a .idx or a loss mask).

    ``recorded``: the (sha256, [size, mtime_ns]) a cache manifest holds for the file; when the file
    has that size and mtime, the recorded sha256 is taken without reading it. Otherwise the file is
    hashed, once per process while it is unchanged.

    Why not hash on one rank and broadcast: ``CacheReader.check`` runs on every rank of a
    distillation job, but not the same number of times on each (a mixed run's rank 0 checks again,
    alone, for its live teacher, then broadcasts the result), and a rank can fail before it (a
    manifest it cannot read): a collective in here could pair with another one or wait forever. A
    stat per file is cheap on every rank and never waits for another. Its blind spot is a file
    rewritten in place with the same size and mtime (a deliberately reset timestamp); a corpus
    copied with its mtimes (rsync -a, cp -p) or left where the cache job read it is not hashed
    again, one copied without them is hashed once by each process that checks it."""
    st = os.stat(path)
    stat = [st.st_size, st.st_mtime_ns]
    if recorded[0] is not None and recorded[1] is not None and [int(x) for x in recorded[1]] == stat:
        return recorded[0], stat
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = sha256_file(path)
        after = os.stat(path)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != key[2:]:
            raise ValueError(f"data.path: {path} changed while it was read (is it still being written?)")
        _DIGESTS[key] = digest
    return digest, stat


def dataset_identity(data: DataConfig, targets: bool = False, recorded: Optional[dict] = None) -> dict:
    """What fixes the token windows of train sample g and the teacher's view of them: corpus files,
    shuffle seed, split, packing and attention; with ``targets`` also which labels are targets
    (each corpus' loss mask and data.loss_mask).

    ``recorded``: a cache manifest's dataset section; a corpus file with the size and mtime recorded
    there (same position in data.path) is not read again (``corpus_file_digest``)."""
    if data.mock:
        return {"mock": True, "seed": data.seed}
    known = recorded.get("prefixes") if recorded and not recorded.get("mock") else None
    prefixes = []
    for i, prefix in enumerate(data.path):
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        if not idx.is_file() or not bin_.is_file():
            raise ValueError(f"data.path: {prefix} is not an indexed dataset ({idx} / {bin_} missing)")
        rec = known[i] if known is not None and i < len(known) and isinstance(known[i], dict) else {}
        sha, stat = corpus_file_digest(idx, (rec.get("idx_sha256"), rec.get("idx_stat")))
        entry = {"path": str(prefix), "bin_bytes": bin_.stat().st_size, "idx_sha256": sha, "idx_stat": stat}
        if targets:
            mask = Path(loss_mask_path(str(prefix)))
            entry["loss_mask_sha256"] = None
            if mask.is_file():
                entry["loss_mask_sha256"], entry["loss_mask_stat"] = corpus_file_digest(
                    mask, (rec.get("loss_mask_sha256"), rec.get("loss_mask_stat")))
        prefixes.append(entry)
    out = {"mock": False, "prefixes": prefixes, "seed": data.seed, "split": [float(x) for x in data.split]}
    if data.weights is not None:  # blended corpora: the weights decide which window sample g is
        out["weights"] = [float(w) for w in data.weights]
    if data.packing != "stream":  # other windows (recorded only when not the default, as before)
        out["packing"] = data.packing
        # Version of the packing rule: 2 splits before packing and cuts long documents into pieces
        # sharing one token (packing.py); a cache of the earlier windows does not match.
        out["packing_rule"] = 2
    if data.attention != "window":  # the teacher saw each document alone: other logits
        out["attention"] = data.attention
    if targets:
        out["loss_mask"] = data.loss_mask
    return out


# How a teacher's weight digest is made (a manifest's teacher ``weights_hash``): "files", sha256
# over each file's name and own sha256, the files hashed side by side in threads (hashlib releases
# the GIL: a 405B teacher's 810 GB at the storage's pace, not one core's 1.6 GB/s: 8+ minutes);
# "stream" (manifests without the key), sha256 over each file's name and bytes in turn.
_HASH_THREADS = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _weights_digest(files: list[Path], rule: str) -> str:
    h = hashlib.sha256()
    if rule == "stream":
        for f in files:
            h.update(f.name.encode() + b"\0")
            sha256_file(f, h)
        return h.hexdigest()
    if rule != "files":
        raise ValueError(f"teacher weights digest rule {rule!r} (weights_hash) is not one this version of kdtrain "
                         "makes: the cache was written by another version")
    with ThreadPoolExecutor(max(1, min(len(files), _HASH_THREADS))) as pool:
        # Largest first: the last file to start is a small one.
        order = sorted(range(len(files)), key=lambda i: -os.path.getsize(files[i]))
        digests = dict(zip(order, pool.map(lambda i: sha256_file(files[i]), order)))
    for i, f in enumerate(files):
        h.update(f.name.encode() + b"\0" + digests[i].encode() + b"\n")
    return h.hexdigest()


def teacher_weights(load: Optional[str], recorded: Optional[dict] = None) -> tuple[Optional[str], Optional[list]]:
    """(sha256, [[file, size, mtime_ns], ...]) of the weight files a Teacher loads from ``load``: a
    kdtrain checkpoint's shard files, or a Hugging Face directory's safetensors files; the digest
    covers their names and bytes (``weights_hash`` "files", or ``recorded``'s rule), ``file`` is
    the path under ``load``.

    ``recorded``: a cache manifest's teacher section. When the files are the ones listed there
    (same names, sizes and mtimes), its digest is taken without reading them: a 70B teacher is
    140 GB, read by the cache job's rank 0 at every (re)start and by a mixed run's rank 0 while
    the other ranks wait (under distributed.idle_timeout_s). Otherwise the files are
    hashed, once per process while they are unchanged (blind spot: as corpus_file_digest)."""
    if load is None:
        return None, None
    from ..convert.hf_weights import hf_weight_files, is_hf_model_dir  # torch-heavy imports, only when hashing
    from ..training.step_dirs import latest_checkpoint

    if is_hf_model_dir(load):
        files = hf_weight_files(load)
    else:
        step_dir = latest_checkpoint(load) or Path(load)
        files = sorted((step_dir / "shards").glob("*.pt"))
        if not files:
            raise ValueError(f"teacher.load: {load} has no checkpoint weight files ({step_dir}/shards/*.pt) and is "
                             "not a Hugging Face model directory")
    stats = [os.stat(f) for f in files]
    listed = [[os.path.relpath(f, load), st.st_size, st.st_mtime_ns] for f, st in zip(files, stats)]
    if recorded and recorded.get("weights_sha256") and recorded.get("weights_stat") == listed:
        return recorded["weights_sha256"], listed
    rule = weights_hash_rule(recorded)
    key = (rule, *((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for st in stats))
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = _weights_digest(files, rule)
    return digest, listed


def weights_hash_rule(recorded: Optional[dict]) -> str:
    """The rule a digest compared with ``recorded`` (a manifest's teacher section) must follow:
    its ``weights_hash``, "stream" for manifests without it; "files" for a new manifest."""
    if recorded and recorded.get("weights_sha256"):
        return recorded.get("weights_hash", "stream")
    return "files"


def teacher_weights_digest(load: Optional[str]) -> Optional[str]:
    """The digest of the weight files a Teacher loads from ``load``, as a new cache manifest
    records it (``weights_hash`` "files")."""
    return teacher_weights(load)[0]


def teacher_identity(model: ModelConfig, load: Optional[str], seed: int, dtype: str,
                     recorded: Optional[dict] = None) -> dict:
    """A cache manifest's teacher section; ``recorded``: as ``teacher_weights``."""
    digest, stat = teacher_weights(load, recorded)
    out = {"model": to_dict(model), "load": load, "weights_sha256": digest, "weights_stat": stat,
           "random_init_seed": None if load else seed, "dtype": dtype}
    if digest is not None and weights_hash_rule(recorded) != "stream":  # a manifest without it: as it was
        out["weights_hash"] = "files"
    return out


def _content(d: Optional[dict], drop=("path", "load") + _STAT_KEYS) -> object:
    """A section without its paths (moving a corpus or checkpoint does not change the cache) and
    its files' sizes and mtimes (a copy of a corpus is the same corpus)."""
    if isinstance(d, dict):
        return {k: _content(v, drop) for k, v in d.items() if k not in drop}
    if isinstance(d, list):
        return [_content(v, drop) for v in d]
    return d


@dataclass
class Manifest:
    teacher: dict
    tokenizer: Optional[dict]
    dataset: dict
    seq_length: int
    vocab_size: int
    k: int
    tau: float
    values_dtype: str
    shard_samples: int
    num_samples: int
    job: dict = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    positions: str = "all"
    version: int = VERSION  # cache format (loaded caches: the one they were written in)

    @property
    def shard_version(self) -> int:
        return SHARD_VERSIONS[self.version]

    @property
    def layout(self) -> RecordLayout | TargetRecordLayout:
        cls = TargetRecordLayout if self.positions == "targets" else RecordLayout
        return cls(self.seq_length, self.k, self.vocab_size, self.values_dtype)

    @property
    def index(self) -> ShardIndex:
        """Sample -> shard; ``record_bytes`` 0 for variable-size records (offsets in each shard)."""
        variable = self.positions == "targets"
        return ShardIndex(self.num_samples, self.shard_samples, 0 if variable else self.layout.record_bytes)

    def identity(self) -> str:
        """Digest of everything that defines the cached bytes and files (not paths, nor the job's
        layout; the shard size is in it, and an automatic one depends on the job's data-parallel
        size: kdtrain/cache/job.py)."""
        key = {"format": FORMAT, "version": self.version, "teacher": _content(self.teacher),
               "tokenizer": _content(self.tokenizer), "dataset": _content(self.dataset),
               "seq_length": self.seq_length, "vocab_size": self.vocab_size, "k": self.k, "tau": self.tau,
               "values_dtype": self.values_dtype, "shard_samples": self.shard_samples}
        if self.positions != "all":  # caches of every position keep the identity they always had
            key["positions"] = self.positions
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": self.version, "complete": self.complete, "identity": self.identity(),
                "teacher": self.teacher, "tokenizer": self.tokenizer, "dataset": self.dataset,
                "seq_length": self.seq_length, "vocab_size": self.vocab_size, "k": self.k, "tau": self.tau,
                "values_dtype": self.values_dtype, "shard_samples": self.shard_samples,
                "num_samples": self.num_samples, "positions": self.positions, "layout": self.layout.to_dict(),
                "job": self.job,
                "shards": [s.to_dict() for s in self.shards]}

    def save(self, root: str | os.PathLike) -> Path:
        """Atomic write of ``root/manifest.json``."""
        root = Path(root)
        final, tmp = root / MANIFEST, root / f".{MANIFEST}.tmp"
        write_synced(tmp, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        os.replace(tmp, final)
        fsync_dir(root)
        return final

    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise ValueError(f"{root} is not a teacher cache (no {MANIFEST}); write one with scripts/cache_teacher.py")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"cache manifest {path} is corrupt: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"cache manifest {path} is corrupt: a JSON object was expected, got {type(d).__name__}")
        if d.get("format") != FORMAT or d.get("version") not in SHARD_VERSIONS:
            raise ValueError(f"cache manifest {path}: format {d.get('format')!r} version {d.get('version')} "
                             f"is not {FORMAT!r} version {' or '.join(map(str, SHARD_VERSIONS))} (written by "
                             "another kdtrain release: write the cache again with scripts/cache_teacher.py)")
        try:
            m = cls(teacher=d["teacher"], tokenizer=d["tokenizer"], dataset=d["dataset"],
                    seq_length=int(d["seq_length"]), vocab_size=int(d["vocab_size"]), k=int(d["k"]),
                    tau=float(d["tau"]), values_dtype=str(d["values_dtype"]), shard_samples=int(d["shard_samples"]),
                    num_samples=int(d["num_samples"]), job=d.get("job", {}),
                    shards=[ShardInfo.from_dict(s) for s in d["shards"]], complete=bool(d["complete"]),
                    positions=str(d.get("positions", "all")), version=int(d["version"]))
            if m.positions not in POSITIONS:
                raise ValueError(f"positions {m.positions!r} is not one of {list(POSITIONS)}")
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"cache manifest {path} is incomplete or malformed: {e!r}") from None
        if d.get("identity") != m.identity():
            raise ValueError(f"cache manifest {path}: identity digest does not match its fields (edited by hand?)")
        return m

    # -- comparison with a run ----------------------------------------------------------------

    def mismatch(self, other: "Manifest") -> Optional[str]:
        """First field (by name) in which two cache jobs' identities differ, or None."""
        for name in ("teacher", "tokenizer", "dataset", "seq_length", "vocab_size", "k", "tau", "values_dtype",
                     "shard_samples", "positions"):
            a, b = _content(getattr(self, name)), _content(getattr(other, name))
            if a != b:
                return name
        return None

    def check_against(self, run, where: str = "cache", live_teacher_dtype: Optional[str] = None) -> None:
        """Raise ValueError naming the field where distillation run config ``run`` (a DistillConfig)
        disagrees with this cache: vocab_size, seq_length, k, tau, dataset, tokenizer, teacher.

        A run with a smaller ``teacher.topk`` than the cache is accepted: the cached ids are sorted
        by descending logit, so the first k entries are the run's top-k. ``live_teacher_dtype`` (mixed
        online/cached runs: the live teacher's compute dtype, e.g. "bfloat16") also checks that the
        live teacher is the cache's: the same precision, and the same weights (hashes its checkpoint
        unless its files are the ones the manifest lists, ``teacher_weights``, or, for a seeded
        random teacher, compares the seed)."""
        def fail(name: str, cache_val, run_val, hint: str = "") -> ValueError:
            return ValueError(f"{where}: {name} mismatch: the cache was written with {name} = {cache_val}, "
                              f"the run has {run_val}{hint}")

        vocab = run.teacher.model.vocab_size
        if vocab != self.vocab_size:
            raise fail("vocab_size", self.vocab_size, f"{vocab} (teacher.model)")
        if run.data.seq_length != self.seq_length:
            raise fail("seq_length", self.seq_length, f"{run.data.seq_length} (data.seq_length)")
        if run.teacher.topk > self.k:
            raise fail("k", self.k, f"{run.teacher.topk} (teacher.topk)",
                       "; a cache serves any k up to the one it was written with")
        if float(run.loss.tau) != self.tau:
            raise fail("tau", self.tau, f"{run.loss.tau} (loss.tau)", "; the cached tail log-mass depends on tau")
        data = dataset_identity(run.data, targets=self.positions == "targets", recorded=self.dataset)
        if self.positions == "targets" and data.get("loss_mask") != self.dataset.get("loss_mask"):
            raise fail("data.loss_mask", self.dataset.get("loss_mask"), data.get("loss_mask"),
                       "; the cache holds the teacher's output at the targets only (cache.positions: targets)")
        if _content(data) != _content(self.dataset):
            raise fail("dataset", _describe_dataset(self.dataset), f"{_describe_dataset(data)} (data.*)",
                       "; files, shuffle seed and split must all match" + (
                           ", and the corpora's loss masks (the cache holds the targets only)"
                           if self.positions == "targets" else ""))
        tok = tokenizer_identity(run.data.tokenizer)
        if tok is not None and self.tokenizer is not None and tok["fingerprint"] != self.tokenizer["fingerprint"]:
            raise fail("tokenizer", f"{self.tokenizer['path']} (fingerprint {self.tokenizer['fingerprint']})",
                       f"{tok['path']} (fingerprint {tok['fingerprint']}, data.tokenizer)")
        if to_dict(run.teacher.model) != self.teacher["model"]:
            ours, theirs = to_dict(run.teacher.model), self.teacher["model"]
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise fail("teacher", f"model {theirs.get('name')!r}", f"model {ours.get('name')!r} (teacher.model; "
                       f"differing fields {diff})")
        if live_teacher_dtype is None:
            return
        cached_dtype = self.teacher.get("dtype")
        if live_teacher_dtype != cached_dtype:
            names = {"float32": "fp32", "bfloat16": "bf16"}
            raise ValueError(f"precision.dtype: the live teacher of this mixed run computes in {live_teacher_dtype}, "
                             f"the {where} was written by a teacher computing in {cached_dtype}: live and cached "
                             f"payloads would differ by rounding; set precision.dtype="
                             f"{names.get(cached_dtype, cached_dtype)} or rewrite the cache")
        if run.teacher.load is None:  # a seeded random live teacher (benchmarks, tests)
            seed = run.training.seed + 1
            if self.teacher["weights_sha256"] is not None or self.teacher.get("random_init_seed") != seed:
                written = (f"weights from {self.teacher['load']}" if self.teacher["weights_sha256"] is not None
                           else f"random weights of seed {self.teacher.get('random_init_seed')}")
                raise fail("teacher", written, f"random weights of seed {seed} (teacher.random_init, "
                           "training.seed + 1)")
        else:
            digest, _ = teacher_weights(run.teacher.load, self.teacher)
            if digest != self.teacher["weights_sha256"]:
                raise fail("teacher", f"weights {self.teacher['weights_sha256']} from {self.teacher['load']}",
                           f"weights {digest} from {run.teacher.load} (teacher.load)")


def _describe_dataset(d: dict) -> str:
    if d.get("mock"):
        return f"mock data (seed {d['seed']})"
    files = ", ".join(f"{p['path']} ({p['bin_bytes']} bytes, idx sha256 {p['idx_sha256'][:12]})" for p in d["prefixes"])
    return f"[{files}] seed {d['seed']} split {d['split']}"
