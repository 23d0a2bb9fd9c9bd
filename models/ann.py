"""Nearest-neighbour search over FAISS, inner-product metric, numpy in and numpy out.

Pure functions (no files, no config): choose an index type for a catalog size and a memory
budget, build it, search it exactly or approximately, measure recall@K against exact
search, and tune the one search knob that trades speed for recall (``efSearch`` for HNSW,
``nprobe`` for IVF) to the smallest value that reaches a recall target.

Scores are inner products; ``search`` returns ``(scores, ids)`` of shape ``(Q, k)`` with
``-1`` ids (and ``-inf`` scores) where an index has fewer than ``k`` results.

Per-call search parameters go through :func:`search_parameters`, which builds a FAISS
``SearchParameters`` object: the index's own defaults are never changed by a query, so
one index can serve concurrent queries with different knobs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import faiss
import numpy as np

METRIC = faiss.METRIC_INNER_PRODUCT
HNSW_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096)


# ---- choosing and building ---------------------------------------------------------------
def estimate_bytes(factory: str, n: int, d: int) -> int:
    """Approximate resident size in bytes of ``factory`` over ``n`` vectors of dimension ``d``.

    Covers the three shapes :func:`choose_factory` picks (``Flat``, ``HNSW<M>``,
    ``IVF<nlist>,PQ<m>``); other factory strings raise ``ValueError``.
    """
    spec = factory.replace(" ", "")
    if spec == "Flat":
        return 4 * n * d
    if spec.startswith("HNSW") and spec[4:].isdigit():
        m = int(spec[4:])
        # level-0 list of 2M neighbours + ~1 upper-level slot per node (int32), vector,
        # level (int32) and offset (int64) per node
        return n * (4 * d + 4 * (2 * m + 1) + 12)
    if spec.startswith("IVF") and ",PQ" in spec:
        nlist_s, pq_s = spec[3:].split(",PQ", 1)
        nlist, m = int(nlist_s), int(pq_s.split("x")[0])
        # codes (m bytes) + int64 id per vector, coarse centroids, PQ codebooks (256 x d floats)
        return n * (m + 8) + 4 * nlist * d + 4 * 256 * d
    raise ValueError(f"cannot estimate the size of factory {factory!r}")


_TRANSFORM = re.compile(r"PCAW?R?(\d+)|OPQ(\d+)(?:_(\d+))?|RR(\d+)|L2norm")
_CODE = r"Flat|SQ(?:4|6|8|fp16|bf16)|PQ\d+(?:x\d+)?(?:fs|np)?"
_PQ = re.compile(r"PQ(\d+)(?:x(\d+))?(fs|np)?")
_MAIN = re.compile(rf"IVF(?P<nlist>\d+)(?:_HNSW(?P<qm>\d+))?|HNSW(?P<m>\d+)(?:_(?P<code>{_CODE}))?|(?P<alone>{_CODE})")
_REFINE = ("RFlat", "Refine(Flat)")
FACTORY_FORMS = ("[PCA<d> | PCAR<d> | OPQ<m>[_<d>] | RR<d> | L2norm ,] main [, RFlat]; main = Flat | SQ4|6|8|fp16|bf16 "
                 "| PQ<m>[x<bits>][fs] | HNSW<M>[,Flat|SQ..|PQ..] | IVF<nlist>[_HNSW<M>],Flat|SQ..|PQ..")
_LIMITS = {"M": (2, 512), "nlist": (1, 1 << 22), "m": (1, 1 << 16), "bits": (1, 16), "dim": (1, 1 << 16)}


def validate_factory(factory: str, d: int | None = None, n: int | None = None) -> str:
    """Check a FAISS ``index_factory`` string before FAISS parses it (FAISS aborts on some bad ones).

    Accepts the forms in :data:`FACTORY_FORMS` with every number in range (:data:`_LIMITS`);
    with ``d`` (vector dim) and ``n`` (rows) also checks that PQ sub-quantizers divide the
    dimension, that transforms do not grow it, and that IVF / PQ have enough rows to train.
    Returns the string without spaces; raises ``ValueError`` naming the part that is wrong.
    """
    spec = factory.replace(" ", "")
    parts = spec.split(",")

    def fail(why: str) -> ValueError:
        return ValueError(f"index factory {factory!r}: {why}")

    def num(text: str | None, what: str, part: str) -> int | None:
        if text is None:
            return None
        lo, hi = _LIMITS[what]
        if not lo <= int(text) <= hi:
            raise fail(f"{what} = {int(text)} in {part!r} must be in {lo}..{hi}")
        return int(text)

    def check_code(code: str, dim: int | None) -> None:
        pq = _PQ.fullmatch(code)
        if pq is None:
            return
        m, bits = num(pq.group(1), "m", code), num(pq.group(2), "bits", code) or 8
        if pq.group(3) == "fs" and pq.group(2) not in (None, "4"):
            raise fail(f"fast-scan PQ ({code!r}) takes 4 bits per code (x4)")
        if dim is not None and dim % m:
            raise fail(f"{code!r} needs the dimension {dim} to be a multiple of {m}")
        if n is not None and 2 ** bits > n:
            raise fail(f"{code!r} trains {2 ** bits} centroids per sub-quantizer but the index has only {n} vectors")

    if not spec or not all(parts):
        raise fail(f"empty, or an empty part; forms: {FACTORY_FORMS}")
    dim, i = d, 0
    while i < len(parts) and (t := _TRANSFORM.fullmatch(parts[i])):
        out, m = num(t.group(1) or t.group(3) or t.group(4), "dim", parts[i]), num(t.group(2), "m", parts[i])
        if out is not None and dim is not None and out > dim and not parts[i].startswith("OPQ"):
            raise fail(f"{parts[i]!r} outputs {out} dims, more than the {dim} it gets")
        if m is not None and (out or dim) is not None and (out or dim) % m:
            raise fail(f"{parts[i]!r} needs {out or dim} dims to be a multiple of {m}")
        dim, i = out or dim, i + 1
    if len(parts) > i + 1 and parts[-1] in _REFINE:
        parts = parts[:-1]
    main = _MAIN.fullmatch(parts[i]) if i < len(parts) else None
    if main is None:
        raise fail(f"{parts[i] if i < len(parts) else '(nothing)'!r} is not a supported index; forms: {FACTORY_FORMS}")
    nlist = num(main["nlist"], "nlist", parts[i])
    num(main["qm"] or main["m"], "M", parts[i])
    if nlist is not None and n is not None and nlist > n:
        raise fail(f"IVF{nlist} needs at least {nlist} vectors to train, the index has {n}")
    rest = parts[i + 1 :]
    takes = 1 if nlist is not None else (0 if main["code"] or main["alone"] else None)  # None: 0 or 1 code
    if len(rest) > 1 or (takes is not None and len(rest) != takes):
        want = "one vector code after it, e.g. ',Flat' or ',PQ16'" if takes else "nothing after it"
        raise fail(f"{parts[i]!r} takes {want}, got {','.join(rest) or 'nothing'!r}; forms: {FACTORY_FORMS}")
    if rest and not re.fullmatch(_CODE, rest[0]):
        raise fail(f"{rest[0]!r} is not a vector code (Flat, SQ8, PQ<m>[x<bits>]); forms: {FACTORY_FORMS}")
    for code in (main["code"], main["alone"], *rest):
        if code:
            check_code(code, dim)
    return spec


def choose_factory(
    n: int,
    d: int,
    memory_budget_bytes: int,
    exact_max_items: int = 50_000,
    hnsw_m: int = 32,
) -> str:
    """FAISS factory string for ``n`` vectors of dim ``d`` under a memory budget.

    ``Flat`` (exact) up to ``exact_max_items`` vectors; above that ``HNSW<hnsw_m>`` (graph,
    uncompressed vectors) if it fits the budget; otherwise ``IVF<nlist>,PQ<m>`` with
    ``nlist ~ 4 sqrt(n)`` (power of two) and the largest ``m`` (code bytes per vector,
    ``m`` divides ``d``, at least 2 dims per sub-quantizer) that fits.
    """
    if n <= exact_max_items and estimate_bytes("Flat", n, d) <= memory_budget_bytes:
        return "Flat"
    hnsw = f"HNSW{hnsw_m}"
    if estimate_bytes(hnsw, n, d) <= memory_budget_bytes:
        return hnsw
    nlist = int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
    for m in sorted((m for m in range(1, d // 2 + 1) if d % m == 0), reverse=True):
        factory = f"IVF{nlist},PQ{m}"
        if estimate_bytes(factory, n, d) <= memory_budget_bytes:
            return factory
    smallest = estimate_bytes(f"IVF{nlist},PQ1", n, d)
    raise ValueError(
        f"no index of {n} vectors (dim {d}) fits in {memory_budget_bytes / 2**20:.0f} MiB; the smallest "
        f"(IVF{nlist},PQ1) needs ~{math.ceil(smallest / 2**20)} MiB"
    )


def build_index(
    vectors: np.ndarray,
    factory: str,
    ef_construction: int = 80,
    max_train_points: int = 262_144,
    seed: int = 0,
) -> faiss.Index:
    """Build ``factory`` over ``vectors`` (N, d) with the inner-product metric.

    Trainable indexes (IVF, PQ) are trained on at most ``max_train_points`` rows drawn with
    ``seed``; HNSW graphs are built with ``ef_construction``. ``factory`` is checked first
    (:func:`validate_factory`), so a bad string raises ``ValueError`` instead of reaching FAISS.
    """
    x = _as_f32(vectors)  # (N, d)
    n, d = x.shape
    factory = validate_factory(factory, d, n)
    try:
        index = faiss.index_factory(d, factory, METRIC)
    except RuntimeError as e:
        raise ValueError(f"FAISS cannot build index_factory string {factory!r}: {e}") from e
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.efConstruction = ef_construction
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        train = x if n <= max_train_points else x[np.sort(rng.choice(n, max_train_points, replace=False))]
        ivf = ivf_part(index)
        if ivf is not None:
            ivf.cp.seed = seed
        index.train(train)
    index.add(x)
    return index


# ---- searching ---------------------------------------------------------------------------
def knob(index: faiss.Index) -> str | None:
    """The search knob of ``index``: ``"efSearch"`` (HNSW), ``"nprobe"`` (IVF) or None (exact / other)."""
    if _hnsw(index) is not None:
        return "efSearch"
    if ivf_part(index) is not None:
        return "nprobe"
    return None


def search_parameters(index: faiss.Index, ef_search: int | None = None, nprobe: int | None = None):
    """A per-call ``faiss.SearchParameters`` for ``index`` (None when nothing is set).

    Raises ``ValueError`` when a knob is given that ``index`` does not have.
    """
    if ef_search is None and nprobe is None:
        return None
    have = knob(index)
    if ef_search is not None and have != "efSearch":
        raise ValueError(f"efSearch applies to HNSW indexes; this index is {describe(index)}")
    if nprobe is not None and have != "nprobe":
        raise ValueError(f"nprobe applies to IVF indexes; this index is {describe(index)}")
    leaf = faiss.SearchParametersHNSW() if ef_search is not None else faiss.SearchParametersIVF()
    if ef_search is not None:
        leaf.efSearch = int(ef_search)
    else:
        leaf.nprobe = int(nprobe)
    return _wrap_params(faiss.downcast_index(index), leaf)


def search(index: faiss.Index, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product: ``(scores (Q, k) float32, ids (Q, k) int64)``, ``-1`` for none."""
    q = _as_f32(queries)  # (Q, d)
    if params is None:
        scores, ids = index.search(q, k)
    else:
        scores, ids = index.search(q, k, params=params)
    return scores, ids


def exact_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner product of ``queries`` (Q, d) against ``base`` (N, d)."""
    k = min(k, len(base))
    scores, ids = faiss.knn(_as_f32(queries), _as_f32(base), k, metric=METRIC)
    return scores, ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (ids ``-1`` never count)."""
    a, e = approx_ids[:, :k], exact_ids[:, :k]
    hits = [len(set(row_a[row_a >= 0].tolist()) & set(row_e[row_e >= 0].tolist())) for row_a, row_e in zip(a, e)]
    denom = min(k, e.shape[1]) if e.size else k
    return float(np.mean(hits) / denom) if hits else 1.0


@dataclass
class Tuning:
    """Result of :func:`tune`: the chosen knob value and the recall it reached."""

    knob: str | None
    value: int | None
    recall: float  # recall@k of the chosen value on the tuning queries
    reached: bool  # whether ``recall >= target``
    curve: list[tuple[int, float]] = field(default_factory=list)  # (value, recall) tried, ascending


def tune(
    index: faiss.Index,
    query_sets: list[tuple[np.ndarray, np.ndarray]],
    k: int,
    target: float,
) -> Tuning:
    """Smallest ``efSearch`` / ``nprobe`` whose recall@k reaches ``target`` on every query set.

    ``query_sets`` is a list of ``(queries (Q, d), exact_ids (Q, k))``; the recall of a value is
    the minimum over the sets. When no value reaches the target, the value with the highest
    recall is returned with ``reached=False``.
    """
    name = knob(index)
    if name is None:
        rec = min(recall_at_k(search(index, q, k)[1], e, k) for q, e in query_sets)
        return Tuning(None, None, rec, rec >= target, [])
    if name == "efSearch":
        values = sorted({max(k, v) for v in HNSW_EF})
    else:
        nlist = ivf_part(index).nlist
        values = sorted({v for v in (2 ** i for i in range(int(math.log2(nlist)) + 1))} | {nlist})
    curve: list[tuple[int, float]] = []
    for v in values:
        params = search_parameters(index, **({"ef_search": v} if name == "efSearch" else {"nprobe": v}))
        rec = min(recall_at_k(search(index, q, k, params)[1], e, k) for q, e in query_sets)
        curve.append((v, rec))
        if rec >= target:
            return Tuning(name, v, rec, True, curve)
    best_v, best_r = max(curve, key=lambda t: (t[1], -t[0]))
    return Tuning(name, best_v, best_r, False, curve)


def set_default(index: faiss.Index, name: str | None, value: int | None) -> None:
    """Set ``index``'s default ``efSearch`` / ``nprobe`` (call before the index is shared)."""
    if name is not None and value is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, int(value))


def default_knob(index: faiss.Index) -> tuple[str | None, int | None]:
    """The current default value of ``index``'s search knob."""
    name = knob(index)
    if name == "efSearch":
        return name, int(_hnsw(index).efSearch)
    if name == "nprobe":
        return name, int(ivf_part(index).nprobe)
    return None, None


def describe(index: faiss.Index) -> str:
    """Class name of the outermost FAISS index (e.g. ``IndexHNSWFlat``)."""
    return type(faiss.downcast_index(index)).__name__


def ivf_part(index: faiss.Index):
    """The IVF index inside ``index`` (through wrappers), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


# ---- internals ---------------------------------------------------------------------------
def _as_f32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array (rows, dim), got shape {x.shape}")
    return x


def _hnsw(index: faiss.Index):
    idx = faiss.downcast_index(index)
    while isinstance(idx, (faiss.IndexPreTransform, faiss.IndexRefine)):
        idx = faiss.downcast_index(idx.index if isinstance(idx, faiss.IndexPreTransform) else idx.base_index)
    return idx.hnsw if isinstance(idx, faiss.IndexHNSW) else None


def _wrap_params(idx: faiss.Index, leaf):
    """Nest ``leaf`` inside the wrapper parameter objects that ``idx``'s wrappers expect."""
    if isinstance(idx, faiss.IndexPreTransform):
        inner = _wrap_params(faiss.downcast_index(idx.index), leaf)
        outer = faiss.SearchParametersPreTransform(index_params=inner)
    elif isinstance(idx, faiss.IndexRefine):
        inner = _wrap_params(faiss.downcast_index(idx.base_index), leaf)
        outer = faiss.IndexRefineSearchParameters(base_index_params=inner, k_factor=idx.k_factor)
    else:
        return leaf
    outer.referenced = inner  # keep the Python proxy (and its C++ object) alive with the outer one
    return outer
