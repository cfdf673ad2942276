"""LIDC-IDRI in its original form (DICOM CT series + LIDC XML reads) to the common layout, with consensus masks.

Expected folder: one series per folder - either ``root`` itself (flat) or any sub-folder below it (e.g. the TCIA
tree ``LIDC-IDRI-0001/<study>/<series>/``) - holding the series' ``*.dcm`` files and its LIDC XML file(s)
(root element ``LidcReadMessage``, namespace ``http://www.nih.gov``). Folders whose XML files are all
``IdriReadMessage`` (the chest radiograph reads of LIDC-IDRI) are skipped with a log line. Every slice becomes an
item (lung window by default, through :mod:`covtoken.data.dicom`); every slice gets a sealed mask, empty where no
nodule reaches consensus.

The XML, as read here: each ``readingSession`` (one radiologist) lists ``unblindedReadNodule`` elements
(``noduleID``, optional ``characteristics``, one ``roi`` per slice with ``imageZposition``, ``imageSOP_UID``,
``inclusion`` TRUE/FALSE and ``edgeMap`` points ``xCoord``/``yCoord`` in pixel columns/rows). Nodules < 3 mm
carry a single edgeMap point and no characteristics. ``nonNodule`` entries are points on other findings and are
ignored. A roi is mapped to its slice by ``imageSOP_UID``; only when that element is absent or empty does
``imageZposition`` decide (nearest ImagePositionPatient z within 0.4 of the smallest slice gap). A SOP UID that
is not in the series is an error.

Region of a roi (decided here, documented): the pixels whose centres lie in the CLOSED polygon through the
edgeMap points, i.e. the interior plus the contour itself. LIDC readers were asked to draw just outside the
nodule, and pylidc also keeps the contour pixels, so masks are slightly generous at the rim. Because the LIDC
edge maps are chains of adjacent pixels, every contour point is part of the region. A single-point roi (small
nodule) marks exactly that one pixel; a two-point roi marks the segment. For one reader's nodule on one slice the
region is the union of its ``inclusion=TRUE`` rois minus the union of its ``inclusion=FALSE`` rois (holes; the
hole's own contour is removed with it, the same closed-polygon rule).

Matching across readers (after pylidc's ``Scan.cluster_annotations``, re-implemented, not copied): two reader
nodules are adjacent when their filled regions overlap on a common slice or when the smallest 3-D distance
between their contour points (mm: pixel spacing in-plane, ImagePositionPatient z across slices) is at most
``tol`` (default: the series SliceThickness, as pylidc; the median slice gap when that is missing). Nodules are
the connected components. While a component holds more than four reader nodules or two from the same reader,
``tol`` is multiplied by 0.9 and the grouping redone (pylidc does the first; the second is added here because a
reader votes once), down to 0.1 mm, after which a warning is logged and a reader's several nodules in one group
count as one vote (their union).

Consensus (as pylidc ``utils.consensus``): for a nodule marked by ``k`` distinct readers a pixel is lesion when
at least ``consensus * k`` of them include it; a reader who marked the nodule but not on this slice votes no
there. The slice mask is the union over nodules. Labels per slice: ``n_readers`` (reading sessions in the
XML(s)), ``nodules`` (nodules with consensus pixels on the slice), ``readers_per_nodule`` (their ``k``),
``consensus`` and ``annotation``. The mask's ``source`` is the (first) XML file.
"""
from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from .deid import is_deidentified
from .dicom import DicomSlice, read_series, slices_to_items
from .layout import EvalMasks, ImageItem, SealedMask

__all__ = ["load_lidc_xml", "roi_region", "ReaderNodule", "Roi", "parse_lidc_xml", "cluster_reader_nodules",
           "LIDC_NAMESPACE"]

log = logging.getLogger(__name__)

#: Namespace of the LIDC XML messages.
LIDC_NAMESPACE = "http://www.nih.gov"
_LIDC_ROOT = "LidcReadMessage"
_IDRI_ROOT = "IdriReadMessage"  # chest radiograph reads: no CT contours
#: pylidc's shrink factor and floor for the grouping tolerance.
_TOL_FACTOR = 0.9
_TOL_FLOOR_MM = 0.1
_MAX_READERS = 4


@dataclass(frozen=True)
class Roi:
    """One contour of one reader's nodule on one slice.

    Attributes:
        slice_index: index into the position-sorted series.
        points: ``(n, 2)`` float array of (x = column, y = row) pixel coordinates.
        inclusion: False for a hole to subtract.
    """

    slice_index: int
    points: np.ndarray
    inclusion: bool


@dataclass(frozen=True)
class ReaderNodule:
    """One ``unblindedReadNodule`` of one reading session, its rois resolved to slices.

    Attributes:
        reader: index of the reading session over all XML files of the series (0-based).
        nodule_id: the XML ``noduleID``.
        rois: its contours.
        small: True for a single-point mark (nodule < 3 mm).
        source: ``"<xml path>: readingSession i nodule <id>"``, for messages.
    """

    reader: int
    nodule_id: str
    rois: tuple[Roi, ...]
    small: bool
    source: str


def _local(tag: str) -> str:
    """Tag without its ``{namespace}``."""
    return tag.rsplit("}", 1)[-1]


def _children(elem: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in elem if _local(c.tag) == name]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    for c in elem:
        if _local(c.tag) == name:
            return c
    return None


def _text(elem: ET.Element, name: str) -> str | None:
    c = _child(elem, name)
    if c is None or c.text is None:
        return None
    t = c.text.strip()
    return t or None


def _read_root(path: Path) -> ET.Element:
    try:
        return ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{path}: malformed XML: {exc}") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from exc


def _float(text: str | None, where: str, field: str) -> float:
    if text is None:
        raise ValueError(f"{where}: missing {field}")
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{where}: {field} is not a number: {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: {field} is not finite: {text!r}")
    return v


def _header_series_uid(root: ET.Element) -> str | None:
    header = _child(root, "ResponseHeader")
    if header is None:
        return None
    for c in header:  # LIDC writes "SeriesInstanceUid"; accept any capitalisation
        if _local(c.tag).lower() == "seriesinstanceuid" and c.text and c.text.strip():
            return c.text.strip()
    return None


def _slice_lookup(slices: Sequence[DicomSlice]) -> tuple[dict[str, int], np.ndarray, float]:
    by_sop = {s.meta["sop_instance_uid"]: i for i, s in enumerate(slices)}
    zs = np.array([np.nan if s.position is None else s.position[2] for s in slices], dtype=np.float64)
    finite = np.sort(zs[np.isfinite(zs)])
    gaps = np.diff(finite)
    gaps = gaps[gaps > 1e-6]
    z_tol = 0.4 * float(gaps.min()) if gaps.size else 0.5
    return by_sop, zs, z_tol


def parse_lidc_xml(
    path: str | Path, slices: Sequence[DicomSlice], *, reader_offset: int = 0
) -> tuple[int, list[ReaderNodule]]:
    """Read one ``LidcReadMessage`` file against its series.

    Args:
        path: the XML file.
        slices: the series, sorted (from :func:`covtoken.data.dicom.read_series`).
        reader_offset: added to the reading-session index (several XML files for one series).

    Returns:
        ``(number of reading sessions, reader nodules)``; ``nonNodule`` marks are skipped.

    Raises:
        ValueError: naming the file and field - malformed XML, another root element, a series UID in the
            ResponseHeader that is not the series', a roi whose SOP UID is not in the series (or, without a SOP
            UID, whose z matches no slice), a missing or non-numeric coordinate, a point outside the image,
            an ``inclusion`` other than TRUE/FALSE.
    """
    path = Path(path)
    root = _read_root(path)
    if _local(root.tag) != _LIDC_ROOT:
        raise ValueError(f"{path}: root element is {_local(root.tag)!r}, expected {_LIDC_ROOT!r}")
    series_uid = slices[0].meta["series_instance_uid"]
    xml_series = _header_series_uid(root)
    if xml_series is not None and xml_series != series_uid:
        raise ValueError(f"{path}: ResponseHeader SeriesInstanceUid {xml_series} is not the series next to it "
                         f"({series_uid}, {slices[0].path})")
    rows, cols = slices[0].hu.shape
    by_sop, zs, z_tol = _slice_lookup(slices)
    sessions = _children(root, "readingSession")
    out: list[ReaderNodule] = []
    for s_idx, session in enumerate(sessions):
        reader = reader_offset + s_idx
        for n_idx, nod in enumerate(_children(session, "unblindedReadNodule")):
            nid = _text(nod, "noduleID")
            if nid is None:
                raise ValueError(f"{path}: readingSession {s_idx + 1} unblindedReadNodule {n_idx + 1}: "
                                 "missing noduleID")
            where_nod = f"{path}: readingSession {s_idx + 1} nodule {nid!r}"
            rois: list[Roi] = []
            for r_idx, roi in enumerate(_children(nod, "roi")):
                where = f"{where_nod} roi {r_idx + 1}"
                sop = _text(roi, "imageSOP_UID")
                z_text = _text(roi, "imageZposition")
                if sop is not None:
                    if sop not in by_sop:
                        raise ValueError(f"{where}: imageSOP_UID {sop} is not in series {series_uid} "
                                         f"({slices[0].path} ...)")
                    k = by_sop[sop]
                    if z_text is not None and np.isfinite(zs[k]):
                        z = _float(z_text, where, "imageZposition")
                        if abs(z - zs[k]) > z_tol:
                            log.warning("%s: imageZposition %.3f differs from slice %s z %.3f; using the SOP UID",
                                        where, z, slices[k].path, zs[k])
                else:
                    z = _float(z_text, where, "imageZposition (and no imageSOP_UID)")
                    if not np.isfinite(zs).any():
                        raise ValueError(f"{where}: no imageSOP_UID and the series has no slice positions")
                    k = int(np.nanargmin(np.abs(zs - z)))
                    if abs(zs[k] - z) > z_tol:
                        raise ValueError(f"{where}: imageZposition {z} matches no slice of the series "
                                         f"(nearest {zs[k]:.3f} mm, tolerance {z_tol:.3f} mm)")
                inc_text = _text(roi, "inclusion")
                if inc_text is None or inc_text.upper() not in ("TRUE", "FALSE"):
                    raise ValueError(f"{where}: inclusion must be TRUE or FALSE, got {inc_text!r}")
                edges = _children(roi, "edgeMap")
                if not edges:
                    raise ValueError(f"{where}: no edgeMap points")
                pts = np.empty((len(edges), 2), dtype=np.float64)
                for e_idx, em in enumerate(edges):
                    x = _float(_text(em, "xCoord"), f"{where} edgeMap {e_idx + 1}", "xCoord")
                    y = _float(_text(em, "yCoord"), f"{where} edgeMap {e_idx + 1}", "yCoord")
                    if not (0 <= x <= cols - 1 and 0 <= y <= rows - 1):
                        raise ValueError(f"{where} edgeMap {e_idx + 1}: point (xCoord={x:g}, yCoord={y:g}) is "
                                         f"outside the {cols}x{rows} image of {slices[k].path}")
                    pts[e_idx] = (x, y)
                rois.append(Roi(slice_index=k, points=pts, inclusion=inc_text.upper() == "TRUE"))
            if not any(r.inclusion for r in rois):
                log.warning("%s: no inclusion roi; ignored", where_nod)
                continue
            small = all(len(r.points) == 1 for r in rois)
            out.append(ReaderNodule(reader=reader, nodule_id=nid, rois=tuple(rois), small=small, source=where_nod))
    return len(sessions), out


def roi_region(points: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, np.ndarray]:
    """Pixels whose centres lie in the closed polygon through ``points`` (interior and contour).

    Pixel ``(row, col)`` has its centre at ``(x, y) = (col, row)``. Interior by the even-odd rule; a centre on
    an edge (or a vertex) counts as inside. One point gives one pixel, two points a segment.

    Args:
        points: ``(n, 2)`` (x, y) coordinates inside the image.
        shape: ``(rows, cols)`` of the image.

    Returns:
        ``(row0, col0, sub)``: the region is ``sub`` (bool) placed at ``[row0:, col0:]``.
    """
    pts = np.asarray(points, dtype=np.float64)
    c0 = max(0, math.floor(pts[:, 0].min()))
    c1 = min(shape[1] - 1, math.ceil(pts[:, 0].max()))
    r0 = max(0, math.floor(pts[:, 1].min()))
    r1 = min(shape[0] - 1, math.ceil(pts[:, 1].max()))
    ys, xs = np.mgrid[r0:r1 + 1, c0:c1 + 1]
    px = xs.reshape(-1, 1).astype(np.float64)
    py = ys.reshape(-1, 1).astype(np.float64)
    a = pts
    b = np.roll(pts, -1, axis=0)
    x1, y1, x2, y2 = a[:, 0][None], a[:, 1][None], b[:, 0][None], b[:, 1][None]
    # on an edge: collinear and within the segment's box (exact for integer coordinates)
    cross = (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1)
    on_edge = ((np.abs(cross) <= 1e-9) & (px >= np.minimum(x1, x2) - 1e-9) & (px <= np.maximum(x1, x2) + 1e-9)
               & (py >= np.minimum(y1, y2) - 1e-9) & (py <= np.maximum(y1, y2) + 1e-9))
    # even-odd crossings of a ray towards +x
    straddle = (y1 > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
    crossings = (straddle & (px < x_at)).sum(axis=1)
    inside = (crossings % 2 == 1) | on_edge.any(axis=1)
    return r0, c0, inside.reshape(ys.shape)


def _paste(canvas: np.ndarray, region: tuple[int, int, np.ndarray], value: bool) -> None:
    r0, c0, sub = region
    view = canvas[r0:r0 + sub.shape[0], c0:c0 + sub.shape[1]]
    if value:
        view |= sub
    else:
        view &= ~sub


def _nodule_masks(nod: ReaderNodule, shape: tuple[int, int]) -> dict[int, np.ndarray]:
    """Per slice: union of inclusion regions minus union of exclusion regions (full-size bool)."""
    inc: dict[int, np.ndarray] = {}
    exc: dict[int, np.ndarray] = {}
    for roi in nod.rois:
        target = inc if roi.inclusion else exc
        canvas = target.setdefault(roi.slice_index, np.zeros(shape, dtype=bool))
        _paste(canvas, roi_region(roi.points, shape), True)
    for k, hole in exc.items():
        if k in inc:
            inc[k] &= ~hole
    return inc


def _min_distance(a: np.ndarray, b: np.ndarray, chunk: int = 2048) -> float:
    best = math.inf
    for i in range(0, len(a), chunk):
        d = ((a[i:i + chunk, None, :] - b[None, :, :]) ** 2).sum(axis=2)
        best = min(best, float(d.min()))
    return math.sqrt(best)


def _components(adjacent: np.ndarray) -> list[list[int]]:
    n = adjacent.shape[0]
    label = [-1] * n
    groups: list[list[int]] = []
    for start in range(n):
        if label[start] >= 0:
            continue
        label[start] = len(groups)
        stack, group = [start], []
        while stack:
            i = stack.pop()
            group.append(i)
            for j in np.flatnonzero(adjacent[i]):
                if label[j] < 0:
                    label[j] = label[start]
                    stack.append(int(j))
        groups.append(sorted(group))
    return groups


def cluster_reader_nodules(
    nodules: Sequence[ReaderNodule],
    masks: Sequence[dict[int, np.ndarray]],
    *,
    z_mm: np.ndarray,
    spacing_mm: tuple[float, float],
    tol_mm: float,
) -> list[list[int]]:
    """Group reader nodules that refer to the same physical nodule (see the module docstring).

    Args:
        nodules: reader nodules of one series.
        masks: ``_nodule_masks`` of each (slice index -> bool mask), used for the overlap test.
        z_mm: z position of each slice.
        spacing_mm: (row, column) pixel spacing.
        tol_mm: starting distance tolerance.

    Returns:
        Groups of indices into ``nodules``.
    """
    n = len(nodules)
    if n == 0:
        return []
    sy, sx = spacing_mm
    clouds = []
    for nod in nodules:
        parts = [np.column_stack([r.points[:, 0] * sx, r.points[:, 1] * sy, np.full(len(r.points), z_mm[r.slice_index])])
                 for r in nod.rois if r.inclusion]
        clouds.append(np.concatenate(parts))
    lo = np.array([c.min(axis=0) for c in clouds])
    hi = np.array([c.max(axis=0) for c in clouds])
    dist = np.full((n, n), math.inf)
    np.fill_diagonal(dist, 0.0)
    for i in range(n):
        for j in range(i + 1, n):
            common = set(masks[i]) & set(masks[j])
            if any((masks[i][k] & masks[j][k]).any() for k in common):
                d = 0.0
            else:
                gap = np.maximum(0.0, np.maximum(lo[i] - hi[j], lo[j] - hi[i]))
                d = math.inf if float(np.linalg.norm(gap)) > tol_mm else _min_distance(clouds[i], clouds[j])
            dist[i, j] = dist[j, i] = d
    tol = tol_mm
    while True:
        groups = _components(dist <= tol)
        bad = [g for g in groups
               if len(g) > _MAX_READERS or len({nodules[i].reader for i in g}) < len(g)]
        if not bad:
            return groups
        if tol * _TOL_FACTOR < _TOL_FLOOR_MM:
            log.warning("%s: could not split %d nodule group(s) to one mark per reader (tolerance down to %.2f mm); "
                        "a reader's marks in one group count as one vote", nodules[bad[0][0]].source, len(bad), tol)
            return groups
        tol *= _TOL_FACTOR


def _series_dirs(root: Path) -> list[Path]:
    dirs = {p.parent for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm"}
    return sorted(dirs)


def _files(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == suffix)


def _load_series(
    folder: Path, xmls: list[Path], *, consensus: float, preset: str, tol_mm: float | None
) -> tuple[list[ImageItem], dict[str, SealedMask]]:
    slices = read_series(_files(folder, ".dcm"))
    shape = slices[0].hu.shape
    nodules: list[ReaderNodule] = []
    n_readers = 0
    for xml in xmls:
        n, found = parse_lidc_xml(xml, slices, reader_offset=n_readers)
        n_readers += n
        nodules.extend(found)
    zs = np.array([np.nan if s.position is None else s.position[2] for s in slices], dtype=np.float64)
    if not np.isfinite(zs).all():
        zs = np.arange(len(slices), dtype=np.float64) * (slices[0].slice_thickness_mm or 1.0)
    spacing = slices[0].spacing_mm or (1.0, 1.0)
    if tol_mm is None:
        gaps = np.diff(np.sort(zs))
        tol_mm = slices[0].slice_thickness_mm or (float(np.median(gaps)) if gaps.size else 1.0)
    per_nodule = [_nodule_masks(nod, shape) for nod in nodules]
    groups = cluster_reader_nodules(nodules, per_nodule, z_mm=zs, spacing_mm=spacing, tol_mm=tol_mm)
    final = [np.zeros(shape, dtype=bool) for _ in slices]
    present: list[list[int]] = [[] for _ in slices]
    for group in groups:
        readers = sorted({nodules[i].reader for i in group})
        k = len(readers)
        need = max(1, math.ceil(consensus * k - 1e-9))
        for z in sorted({s for i in group for s in per_nodule[i]}):
            votes = np.zeros(shape, dtype=np.int32)
            for r in readers:
                mark = np.zeros(shape, dtype=bool)
                for i in group:
                    if nodules[i].reader == r and z in per_nodule[i]:
                        mark |= per_nodule[i][z]
                votes += mark
            lesion = votes >= need
            if lesion.any():
                final[z] |= lesion
                present[z].append(k)
    items = slices_to_items(slices, preset=preset)
    out_items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    src = str(xmls[0])
    for idx, (s, item) in enumerate(zip(slices, items)):
        header = pydicom.dcmread(s.path, stop_before_pixels=True)
        item = ImageItem(image=item.image, image_id=item.image_id, patient_id=item.patient_id, modality=item.modality,
                         spacing_mm=item.spacing_mm, source=item.source,
                         meta={**item.meta, "dicom": True, "deidentified": is_deidentified(header),
                               "slice_index": idx})
        out_items.append(item)
        masks[item.image_id] = SealedMask(final[idx], source=src, labels={
            "n_readers": n_readers, "nodules": len(present[idx]), "readers_per_nodule": sorted(present[idx]),
            "consensus": consensus, "annotation": "LIDC XML reader contours, consensus"})
    log.info("%s: %d slices, %d reader nodule(s) in %d nodule(s), %d reader(s)", folder, len(slices), len(nodules),
             len(groups), n_readers)
    return out_items, masks


def load_lidc_xml(
    root: str | Path, *, consensus: float = 0.5, preset: str = "lung", cluster_tol_mm: float | None = None
) -> tuple[list[ImageItem], EvalMasks]:
    """Load every LIDC-IDRI CT series under ``root`` with consensus nodule masks.

    Args:
        root: a series folder (``*.dcm`` + LIDC XML) or a folder with such folders at any depth.
        consensus: fraction of the readers who marked a nodule that must include a pixel, in (0, 1].
        preset: CT window from :data:`covtoken.data.dicom.PRESETS`.
        cluster_tol_mm: starting tolerance for matching nodules across readers; default the SliceThickness.

    Returns:
        ``(items, masks)``: one item and one sealed mask per slice of every series, sorted by position.

    Raises:
        ValueError: naming the file - no DICOM files, a series folder without an LIDC XML file, any error of
            :func:`parse_lidc_xml` or :func:`covtoken.data.dicom.read_series`, an empty PatientID.
    """
    if not (0.0 < consensus <= 1.0 and math.isfinite(consensus)):
        raise ValueError(f"consensus must be in (0, 1], got {consensus}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    dirs = _series_dirs(root)
    if not dirs:
        raise ValueError(f"{root}: no DICOM (*.dcm) files")
    items: list[ImageItem] = []
    masks: dict[str, SealedMask] = {}
    for folder in dirs:
        xmls = _files(folder, ".xml")
        lidc = [x for x in xmls if _local(_read_root(x).tag) != _IDRI_ROOT]
        if xmls and not lidc:
            log.info("%s: only IdriReadMessage (radiograph) XML; skipped", folder)
            continue
        if not lidc:
            raise ValueError(f"{folder}: DICOM series without an LIDC XML (*.xml) file next to it")
        got_items, got_masks = _load_series(folder, lidc, consensus=consensus, preset=preset, tol_mm=cluster_tol_mm)
        for it in got_items:
            if it.image_id in masks:
                raise ValueError(f"{it.source}: image {it.image_id} appears twice under {root}")
        items.extend(got_items)
        masks.update(got_masks)
    if not items:
        raise ValueError(f"{root}: no CT series with LIDC XML reads")
    return items, EvalMasks(masks, items)
