"""Synthetic thyroid ultrasound (B-mode) for tests and demos: never clinical data.

Each image is simulated rather than drawn: an echogenicity map of the neck (skin,
subcutaneous fat, strap and sternocleidomastoid muscles, thyroid, carotid artery,
jugular vein, trachea, oesophagus, longus colli) drives complex Gaussian scatterers,
which are convolved with an anisotropic point-spread function; the envelope is
Rayleigh-distributed speckle. Attenuation accumulates with depth (so fluid gives
posterior enhancement and air a shadow) and time-gain compensation undoes most of it.
The envelope is log-compressed with a per-image gain and dynamic range, lightly
smoothed (as scan conversion and resizing do) and mapped to 8 bits by a grey-map curve.

Normal glands are homogeneous, fine and moderately bright (brighter than muscle).
Autoimmune (Hashimoto-like) glands are enlarged, hypoechoic, coarse and heterogeneous,
with hypoechoic micronodules (1-6 mm), echogenic fibrous septa and a lobulated contour,
scaled by a per-patient severity, so mild cases overlap with normal ones.

Everything is drawn from the ``numpy.random.Generator`` passed in: the same seed gives
the same pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

logger = logging.getLogger(__name__)

VIEWS = (
    "right_transverse",
    "right_longitudinal",
    "left_transverse",
    "left_longitudinal",
    "isthmus_transverse",
)
LABELS = ("autoimmune", "normal")

# Echogenicity of tissues in dB relative to normal thyroid parenchyma.
_FAT_DB = -14.0
_MUSCLE_DB = -10.0
_SOFT_DB = -10.0
_LUMEN_DB = -60.0
# One-way attenuation in dB/mm: ~0.5 dB/cm/MHz at 7.5 MHz for soft tissue.
_TISSUE_ATTEN = 0.38
_FLUID_ATTEN = 0.02
_AIR_ATTEN = 40.0
_NOISE_DB = -42.0  # electronic noise floor


@dataclass(frozen=True)
class SynthImage:
    """One synthetic B-mode image: its view name and (size, size) uint8 pixels."""

    view: str
    pixels: np.ndarray


@dataclass(frozen=True)
class _Patient:
    """What stays the same across one patient's five images."""

    autoimmune: bool
    severity: float  # 0 (normal) .. 1 (marked thyroiditis)
    depth_mm: float  # displayed depth = field width (square pixels)
    gain_db: float
    dynamic_range_db: float
    grey_gamma: float
    skin_mm: float
    fat_mm: float
    strap_mm: float
    gland_scale: float
    gland_db: float
    hetero_db: float  # std of the coarse echotexture
    hetero_scale_mm: float
    nodules_per_cm2: float
    septa_db: float
    lobulation: float
    isthmus_mm: float
    psf_axial_mm: float
    psf_lateral_mm: float


def _draw_patient(rng: np.random.Generator, label: str) -> _Patient:
    autoimmune = label == "autoimmune"
    # Severity spans mild to marked so that mild cases look nearly normal.
    severity = float(rng.beta(2.0, 1.6)) if autoimmune else float(rng.uniform(0.0, 0.12))
    s = severity if autoimmune else 0.0
    return _Patient(
        autoimmune=autoimmune,
        severity=severity,
        depth_mm=float(rng.uniform(34.0, 44.0)),
        gain_db=float(rng.normal(0.0, 2.5)),
        dynamic_range_db=float(rng.uniform(50.0, 62.0)),
        grey_gamma=float(rng.uniform(1.6, 2.2)),
        skin_mm=float(rng.uniform(1.4, 2.4)),
        fat_mm=float(rng.uniform(1.5, 6.0)),
        strap_mm=float(rng.uniform(2.0, 3.8)),
        gland_scale=float(rng.normal(1.0, 0.08) * (1.0 + 0.45 * s)),
        gland_db=float(rng.normal(0.0, 1.2) - 8.0 * s),
        hetero_db=float(0.8 + severity * 4.5 + rng.uniform(0, 0.8)),
        hetero_scale_mm=float(rng.uniform(0.7, 1.3) * (1.0 + 0.6 * s)),
        nodules_per_cm2=float(s * rng.uniform(4.0, 12.0)),
        septa_db=float(s * rng.uniform(6.0, 10.0)),
        lobulation=float(0.02 + 0.06 * s),
        isthmus_mm=float(rng.uniform(2.0, 3.5) * (1.0 + 1.2 * s)),
        psf_axial_mm=float(rng.uniform(0.15, 0.22)),
        psf_lateral_mm=float(rng.uniform(0.55, 0.75)),
    )


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int], sigma_px: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian random field with zero mean, unit standard deviation, correlation ~sigma_px.

    ``sigma_px`` is one value or (rows, columns) for an anisotropic field. White noise is
    low-pass filtered in the Fourier domain, so the cost does not grow with sigma.
    """
    sy, sx = sigma_px if isinstance(sigma_px, tuple) else (sigma_px, sigma_px)
    noise = rng.standard_normal(shape, dtype=np.float32)
    fy = np.fft.fftfreq(shape[0])
    fx = np.fft.rfftfreq(shape[1])
    # A separable Gaussian transfer function: two 1-D exponentials instead of one 2-D.
    transfer = np.outer(
        np.exp(-2.0 * np.pi**2 * max(sy, 0.3) ** 2 * fy**2),
        np.exp(-2.0 * np.pi**2 * max(sx, 0.3) ** 2 * fx**2),
    ).astype(np.float32)
    field = fft.irfft2(fft.rfft2(noise) * transfer, s=shape)
    # Centre as well as scale: when sigma is large against the shape, the leftover mean of
    # the noise would otherwise dominate (e.g. a TGC error that is one big offset).
    field = field - field.mean()
    return field / (field.std() + 1e-12)


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    """Soft indicator of |distance| < half_width (for thin layers and walls)."""
    return np.clip(1.0 - np.abs(distance) / max(half_width, 1e-6), 0.0, 1.0)


def _soft_inside(signed: np.ndarray, edge: float) -> np.ndarray:
    """Soft indicator of signed < 0, blurred over ``edge`` (same unit as ``signed``)."""
    return np.clip(0.5 - signed / max(edge, 1e-6), 0.0, 1.0)


class _Scene:
    """Maps of one image under construction, in mm coordinates.

    ``refl`` is echogenicity in dB, ``atten`` one-way attenuation in dB/mm, ``specular``
    the amplitude of coherent reflectors (interfaces that look like continuous lines).
    """

    def __init__(self, size: int, depth_mm: float) -> None:
        self.size = size
        self.mm = depth_mm / size
        coords = (np.arange(size) + 0.5) * self.mm
        self.y, self.x = np.meshgrid(coords, coords, indexing="ij")
        self.width = depth_mm  # square pixels and a square field of view
        self.refl = np.full((size, size), _SOFT_DB)
        self.atten = np.full((size, size), _TISSUE_ATTEN)
        self.specular = np.zeros((size, size))
        self.reverb = np.zeros((size, size))

    def paint(self, mask: np.ndarray, db: np.ndarray | float) -> None:
        """Blend echogenicity ``db`` where the soft ``mask`` (0..1) is set."""
        self.refl = self.refl * (1.0 - mask) + mask * db

    def ellipse(self, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
        """Normalised elliptic radius (1 on the boundary) of an ellipse rotated by angle."""
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u = (c * dx + s * dy) / a
        v = (-s * dx + c * dy) / b
        return np.hypot(u, v)


def _top_edge(scene: _Scene, gland: np.ndarray, fallback: float) -> np.ndarray:
    """Depth (mm) of the gland's anterior surface per column; ``fallback`` where absent."""
    inside = gland > 0.5
    return np.where(inside.any(axis=0), np.argmax(inside, axis=0) * scene.mm, fallback)


def _layers(scene: _Scene, rng: np.random.Generator, p: _Patient, top_of_gland: np.ndarray) -> None:
    """Skin, subcutaneous fat and strap muscles above ``top_of_gland`` (mm per column)."""
    y = scene.y
    skin = p.skin_mm
    fat_bottom = skin + p.fat_mm * (
        1.0 + 0.1 * _smooth_field(rng, (1, scene.size), 4.0 / scene.mm)[0]
    )
    scene.paint(_soft_inside(y - skin, 0.3), 3.0)
    fat = (y >= skin) & (y < fat_bottom[None, :])
    # Fat is hypoechoic with echogenic connective strands running roughly horizontally.
    strands = _smooth_field(rng, scene.y.shape, (1.0 / scene.mm, 4.0 / scene.mm))
    strands = np.where(np.abs(strands) < 0.12, 8.0, 0.0)
    scene.paint(fat.astype(float), _FAT_DB + strands)
    # Strap muscles: a band between the fat and the gland, with fibre striations.
    strap_top = fat_bottom[None, :]
    strap_bottom = np.maximum(top_of_gland[None, :], strap_top + p.strap_mm)
    strap = (y >= strap_top) & (y < strap_bottom)
    striation = 2.5 * np.sin(2 * np.pi * (y - strap_top) / rng.uniform(0.7, 1.1))
    scene.paint(strap.astype(float), _MUSCLE_DB + striation)
    # Fascia: thin coherent lines at the top of the straps and at the skin entry.
    scene.specular += 0.12 * _band(y - strap_top, scene.mm * 0.8)
    scene.specular += 0.1 * _band(y - strap_bottom, scene.mm * 0.8)
    scene.specular += 0.6 * _band(y - 0.25, scene.mm)


def _vessel(
    scene: _Scene, cx: float, cy: float, a: float, b: float, wall: float, wall_db: float
) -> None:
    """An anechoic lumen with an echogenic wall; fluid barely attenuates."""
    r = scene.ellipse(cx, cy, a, b)
    lumen = _soft_inside(r - 1.0, 0.08)
    wall_mask = _band(r - 1.0, wall / min(a, b))
    scene.paint(wall_mask, wall_db)
    scene.paint(lumen, _LUMEN_DB)
    scene.atten = scene.atten * (1 - lumen) + lumen * _FLUID_ATTEN
    scene.specular += 0.3 * _band(r - 1.0, 0.5 * scene.mm / min(a, b))


def _trachea(scene: _Scene, cx: float, top: float, radius: float) -> None:
    """Cartilage ring, bright air interface, acoustic shadow and reverberations."""
    cy = top + radius
    r = np.hypot(scene.x - cx, scene.y - cy)
    upper = scene.y < cy
    cartilage = (r < radius) & (r > radius - 1.6) & upper
    scene.paint(cartilage.astype(float), -14.0)  # hyaline cartilage is hypoechoic
    air_radius = radius - 1.6
    # Specular: strongest where the interface faces the probe, fading down the sides.
    facing = np.clip((cy - scene.y) / (r + 1e-9), 0.0, 1.0) ** 4
    scene.specular += 1.0 * _band(r - air_radius, 0.35) * facing * upper
    air = (r < air_radius) | ((np.abs(scene.x - cx) < air_radius) & (scene.y > cy))
    scene.atten = np.where(air, _AIR_ATTEN, scene.atten)
    # Reverberation: copies of the interface at multiples of its depth, fading.
    depth_of_interface = cy - np.sqrt(np.clip(air_radius**2 - (scene.x - cx) ** 2, 0, None))
    inside = np.abs(scene.x - cx) < air_radius * 0.9
    for k, level in ((2, 0.45), (3, 0.25), (4, 0.12)):
        scene.reverb += level * _band(scene.y - k * depth_of_interface, 0.9) * inside


def _gland_texture(
    scene: _Scene, rng: np.random.Generator, p: _Patient, gland: np.ndarray
) -> np.ndarray:
    """Echogenicity (dB) of the parenchyma: homogeneous or coarse with nodules and septa."""
    # Only the gland's bounding box needs texture; it saves most of the work.
    rows = np.flatnonzero(gland.max(axis=1) > 0.01)
    cols = np.flatnonzero(gland.max(axis=0) > 0.01)
    db = np.full(gland.shape, p.gland_db)
    if rows.size == 0:
        return db
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    db[box] = _texture_box(scene, rng, p, gland, box)
    return db


def _texture_box(
    scene: _Scene,
    rng: np.random.Generator,
    p: _Patient,
    full_gland: np.ndarray,
    box: tuple[slice, slice],
) -> np.ndarray:
    """Parenchymal echogenicity (dB) inside ``box``, the bounding box of the gland."""
    gland = full_gland[box]
    shape = gland.shape
    ys, xs = scene.y[box], scene.x[box]
    db = np.full(shape, p.gland_db)
    # Coarse echotexture: lumpy variation at ~1 mm (normal glands have only a trace).
    db = db + p.hetero_db * _smooth_field(rng, shape, p.hetero_scale_mm / scene.mm)
    if p.autoimmune:
        # Larger hypoechoic areas (patchy infiltration) at ~4 mm.
        patches = _smooth_field(rng, shape, 4.0 / scene.mm)
        db = db - 3.0 * p.severity * np.clip(patches, 0, None)
    if p.septa_db > 0:
        # Echogenic fibrous septa: zero lines of a smooth field, cut into segments, give
        # the curving, branching strands of pseudolobulation.
        field = _smooth_field(rng, shape, rng.uniform(2.5, 4.0) / scene.mm)
        grad = np.hypot(*np.gradient(field))
        distance_px = np.abs(field) / (grad + 1e-6)
        keep = _smooth_field(rng, shape, 3.0 / scene.mm) > rng.uniform(-0.3, 0.4)
        septa = _band(distance_px, max(0.2 / scene.mm, 0.6)) * keep
        db = db + p.septa_db * septa
        scene.specular[box] += 0.08 * p.severity * septa * gland
    if p.nodules_per_cm2 > 0:
        area_cm2 = gland.sum() * scene.mm**2 / 100.0
        count = int(rng.poisson(p.nodules_per_cm2 * area_cm2))
        inside = np.flatnonzero(gland.ravel() > 0.5)
        if count and inside.size:
            centres = rng.choice(inside, size=count)
            for centre in centres:
                cy, cx = divmod(int(centre), shape[1])
                radius = float(np.exp(rng.uniform(np.log(0.5), np.log(3.0))))  # 1-6 mm across
                dimming = rng.uniform(8.0, 16.0)
                span = int(np.ceil(radius * 1.4 / scene.mm)) + 1
                rs = slice(max(cy - span, 0), cy + span + 1)
                cs = slice(max(cx - span, 0), cx + span + 1)
                r = np.hypot(ys[rs, cs] - ys[cy, cx], xs[rs, cs] - xs[cy, cx])
                core = _soft_inside(r - radius, 0.4 * radius)
                rim = _band(r - radius * 1.1, 0.25 * radius) * rng.uniform(0.0, 4.0)
                db[rs, cs] += -dimming * core + rim
    return db


def _lobe_mask(
    scene: _Scene,
    rng: np.random.Generator,
    p: _Patient,
    cx: float,
    cy: float,
    a: float,
    b: float,
    angle: float = 0.0,
    taper: float = 0.0,
) -> np.ndarray:
    """Soft mask of a lobe: an ellipse with a wavy (lobulated when diseased) contour."""
    # Draw the contour's harmonics first so the random stream does not depend on the box.
    weights = [p.lobulation * rng.normal(0, 1) / np.sqrt(k - 2) for k in range(3, 9)]
    phases = rng.uniform(0, 2 * np.pi, size=len(weights))
    mask = np.zeros_like(scene.y)
    # Only a box around the lobe can be inside it (taper widens one end by at most 1.3x).
    reach = 1.5 * max(a, b) * (1.0 + 4.0 * p.lobulation)
    rows = np.flatnonzero(np.abs(scene.y[:, 0] - cy) < reach)
    cols = np.flatnonzero(np.abs(scene.x[0] - cx) < reach)
    if rows.size == 0 or cols.size == 0:
        return mask
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = scene.x[box] - cx, scene.y[box] - cy
    u = (c * dx + s * dy) / a
    v = (-s * dx + c * dy) / b
    # Taper one end (the upper pole) so longitudinal lobes look like elongated drops.
    v = v / np.clip(1.0 - taper * u, 0.3, None)
    rho = np.hypot(u, v)
    # cos(k theta + phase) from the angle-addition recurrence on cos(theta), sin(theta):
    # a few multiplications instead of trigonometry on every pixel.
    cos1, sin1 = u / (rho + 1e-12), v / (rho + 1e-12)
    cos_k, sin_k = cos1 * cos1 - sin1 * sin1, 2.0 * cos1 * sin1
    contour = np.ones_like(rho)
    for weight, phase in zip(weights, phases, strict=True):
        cos_k, sin_k = cos_k * cos1 - sin_k * sin1, sin_k * cos1 + cos_k * sin1
        contour += weight * (cos_k * np.cos(phase) - sin_k * np.sin(phase))
    mask[box] = _soft_inside(rho - contour, 0.6 * scene.mm / min(a, b))
    return mask


def _paint_gland(scene: _Scene, rng: np.random.Generator, p: _Patient, gland: np.ndarray) -> None:
    texture = _gland_texture(scene, rng, p, gland)
    scene.paint(gland, texture)
    # The capsule: a thin, slightly echogenic interface around the gland.
    edge = np.hypot(*np.gradient(gland))
    scene.specular += 0.08 * edge / (edge.max() + 1e-9)


def _deep_structures(scene: _Scene, rng: np.random.Generator, depth: float, cx: float) -> None:
    """The anterior surface of a vertebra (or transverse process): a bright arc with a shadow.

    ``depth`` is the depth of its apex and ``cx`` its lateral centre, both in mm.
    """
    radius = rng.uniform(10.0, 20.0)
    half_extent = rng.uniform(0.2, 0.35) * scene.width
    dx = scene.x - cx
    surface = depth + dx**2 / (2.0 * radius)  # a parabola approximates the gentle arc
    span = _soft_inside(np.abs(dx) - half_extent, 4.0)
    scene.specular += 0.2 * _band(scene.y - surface, 0.4) * span
    # Bone reflects and absorbs almost everything: a shadow below the arc, fading at its
    # ends where the surface turns away from the beam.
    scene.atten = np.where(scene.y > surface, scene.atten + 3.0 * span, scene.atten)


def _transverse_lobe(scene: _Scene, rng: np.random.Generator, p: _Patient, left: bool) -> None:
    """Transverse view of one lobe: trachea medially, carotid and jugular laterally.

    Built for the right lobe (trachea on the image right, as the patient's right is on
    the image left) and mirrored for the left lobe.
    """
    w, scale = scene.width, p.gland_scale
    a = rng.uniform(7.5, 9.5) * scale  # half width
    b = rng.uniform(6.5, 8.0) * scale  # half depth (antero-posterior)
    top = p.skin_mm + p.fat_mm + p.strap_mm + rng.uniform(-0.3, 0.3)
    cx = w * rng.uniform(0.47, 0.57)
    cy = top + b
    gland = _lobe_mask(scene, rng, p, cx, cy, a, b, angle=rng.uniform(-0.25, 0.1))
    # Sternocleidomastoid over the lateral part, above the carotid.
    scm = scene.ellipse(w * 0.12, p.skin_mm + p.fat_mm + 3.0, w * 0.3, 3.2, angle=0.12)
    _layers(scene, rng, p, np.minimum(_top_edge(scene, gland, top), top + 1.0))
    scene.paint(
        _soft_inside(scm - 1.0, 0.05),
        _MUSCLE_DB + 2.0 * _smooth_field(rng, scene.y.shape, 0.8 / scene.mm),
    )
    # Longus colli: hypoechoic muscle behind the medial lobe.
    lc = scene.ellipse(cx + a * 0.5, cy + b + 3.5, 6.0, 3.0)
    scene.paint(_soft_inside(lc - 1.0, 0.1), _MUSCLE_DB - 1.0)
    _deep_structures(scene, rng, cy + b + 7.0 + rng.uniform(0, 3), cx + a * rng.uniform(0.3, 1.0))
    if left:
        # The oesophagus sits behind the left lobe, beside the trachea: a target sign.
        ex, ey = cx + a * 0.9, cy + b * 1.0
        oes = scene.ellipse(ex, ey, 5.0, 3.0)
        scene.paint(_soft_inside(oes - 1.0, 0.1), _MUSCLE_DB - 3.0)
        scene.paint(_soft_inside(oes - 0.45, 0.1), -3.0)  # echogenic mucosa
    _paint_gland(scene, rng, p, gland)
    # Carotid lateral to the lobe, jugular vein anterolateral to the carotid.
    carotid_r = rng.uniform(3.0, 3.8)
    ccx = max(cx - a - carotid_r * 0.6, carotid_r + 0.5)
    _vessel(scene, ccx, cy + b * 0.25, carotid_r, carotid_r, 0.7, 6.0)
    if rng.random() < 0.7:  # the jugular is often compressed by the probe
        _vessel(
            scene,
            max(ccx - carotid_r * 1.6, 1.0),
            cy - b * 0.25,
            rng.uniform(3.0, 5.0),
            rng.uniform(1.0, 2.5),
            0.3,
            2.0,
        )
    trachea_radius = rng.uniform(9.0, 11.0)
    trachea_top = top - 0.5 + rng.uniform(0, 1.5)
    _trachea(scene, cx + a + rng.uniform(8.5, 10.5), trachea_top, trachea_radius)


def _longitudinal_lobe(scene: _Scene, rng: np.random.Generator, p: _Patient) -> None:
    """Sagittal view of one lobe: an elongated, tapered gland under the straps."""
    w, scale = scene.width, p.gland_scale
    a = rng.uniform(19.0, 23.0) * scale  # half length, often beyond the field of view
    b = rng.uniform(6.0, 7.5) * scale
    top = p.skin_mm + p.fat_mm + p.strap_mm + rng.uniform(-0.3, 0.3)
    cx = w * rng.uniform(0.45, 0.55)
    cy = top + b
    gland = _lobe_mask(
        scene, rng, p, cx, cy, a, b, angle=rng.uniform(-0.12, 0.12), taper=rng.uniform(0.1, 0.3)
    )
    _layers(scene, rng, p, _top_edge(scene, gland, top + 2.0))
    # Longus colli as a band behind the gland.
    lc_top = cy + b + rng.uniform(0.5, 2.0)
    band = (scene.y > lc_top) & (scene.y < lc_top + rng.uniform(3.0, 5.0))
    striation = 2.0 * np.sin(2 * np.pi * scene.y / rng.uniform(0.8, 1.2))
    scene.paint(band.astype(float), _MUSCLE_DB - 1.0 + striation)
    _deep_structures(scene, rng, lc_top + rng.uniform(6.0, 9.0), w * rng.uniform(0.2, 0.8))
    _paint_gland(scene, rng, p, gland)
    if rng.random() < 0.4:  # a small vessel (inferior thyroid artery) at the lower pole
        _vessel(scene, cx + a * rng.uniform(0.5, 0.8), cy + b * 0.9, 1.5, 1.0, 0.3, 3.0)


def _isthmus(scene: _Scene, rng: np.random.Generator, p: _Patient) -> None:
    """Transverse midline: the isthmus draped over the trachea, lobes at both edges."""
    w, scale = scene.width, p.gland_scale
    top = p.skin_mm + p.fat_mm + p.strap_mm + rng.uniform(-0.3, 0.3)
    radius = rng.uniform(9.0, 11.0)
    tx = w * rng.uniform(0.46, 0.54)
    trachea_top = top + p.isthmus_mm
    ty = trachea_top + radius
    r = np.hypot(scene.x - tx, scene.y - ty)
    # Isthmus: a curved band over the trachea, merging into the lobes at the sides.
    isthmus = _soft_inside(r - (radius + p.isthmus_mm), 0.2) * (r > radius) * (scene.y < ty + 2)
    lobes = np.zeros_like(isthmus)
    for side in (-1, 1):
        lx = tx + side * (radius + rng.uniform(5.0, 8.0) * scale)
        lobes = np.maximum(
            lobes,
            _lobe_mask(
                scene,
                rng,
                p,
                lx,
                ty + 1.0,
                8.0 * scale,
                7.0 * scale,
                angle=side * rng.uniform(0.1, 0.3),
            ),
        )
    gland = np.maximum(isthmus, lobes)
    _layers(scene, rng, p, np.minimum(_top_edge(scene, gland, top), top + 1.0))
    _deep_structures(scene, rng, ty + radius + rng.uniform(3, 6), tx)
    _paint_gland(scene, rng, p, gland)
    _trachea(scene, tx, trachea_top, radius)


def _render(scene: _Scene, rng: np.random.Generator, p: _Patient) -> np.ndarray:
    """Speckle formation, attenuation and TGC, log compression to uint8."""
    size, mm = scene.size, scene.mm
    # Round-trip attenuation accumulated along each beam (image column), then time-gain
    # compensation for average tissue; residual TGC error varies slowly with depth.
    loss = 2.0 * np.cumsum(scene.atten, axis=0) * mm
    tgc = 2.0 * _TISSUE_ATTEN * scene.y + 2.0 * _smooth_field(rng, (size, 1), size / 6)
    amplitude = 10.0 ** ((scene.refl - loss + tgc) / 20.0)
    # Reverberation echoes are not attenuated by the air that causes them; the noise
    # floor keeps shadows from being perfectly black.
    amplitude = amplitude + scene.reverb + 10.0 ** (_NOISE_DB / 20.0)
    # Single precision is ample for speckle and makes scipy's FFTs several times faster.
    scatterers = np.empty((size, size), dtype=np.complex64)
    scatterers.real = rng.standard_normal((size, size), dtype=np.float32)
    scatterers.imag = rng.standard_normal((size, size), dtype=np.float32)
    field = (amplitude / np.sqrt(2.0)).astype(np.float32) * scatterers
    # Specular interfaces reflect coherently (a line, not speckle), broken up along their
    # length as real fascia and capsule echoes are.
    continuity = np.clip(1.0 + 0.7 * _smooth_field(rng, (size, size), 2.5 / mm), 0.1, 2.0)
    field += (3.0 * scene.specular * continuity * 10.0 ** ((tgc - loss) / 20.0)).astype(np.float32)
    # Anisotropic Gaussian PSF (short axially, wider laterally), applied by FFT.
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    sy, sx = p.psf_axial_mm / mm, p.psf_lateral_mm / mm
    transfer = np.exp(-2.0 * np.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    # Normalise so the mean speckle power does not depend on the PSF size in pixels.
    transfer = (transfer / np.sqrt(np.mean(transfer**2))).astype(np.float32)
    envelope = np.abs(fft.ifft2(fft.fft2(field) * transfer))
    # Scan conversion and resizing to the stored matrix average neighbouring samples;
    # without it the axially thin speckle nulls read as black cracks.
    db = ndimage.gaussian_filter(20.0 * np.log10(envelope + 1e-9), 0.7)
    # Per-image gain on top of the patient's: brightness alone must not give the class.
    gain = float(np.clip(p.gain_db + rng.normal(0.0, 2.5), -8.0, 8.0))
    level = np.clip((db + gain + p.dynamic_range_db * 0.74) / p.dynamic_range_db, 0.0, 1.0)
    # The scanner's grey map: a gamma curve that darkens low levels, so speckle shows as
    # bright grains on a darker ground, as on clinical displays.
    return np.round(255.0 * level**p.grey_gamma).astype(np.uint8)


def _synth_view(rng: np.random.Generator, p: _Patient, view: str, size: int) -> SynthImage:
    scene = _Scene(size, p.depth_mm * rng.uniform(0.97, 1.03))
    # Deep soft tissue is not uniform: fascia, fat and small vessels vary its echogenicity.
    scene.refl += 2.5 * _smooth_field(rng, (size, size), (1.0 / scene.mm, 3.0 / scene.mm))
    if view == "isthmus_transverse":
        _isthmus(scene, rng, p)
    elif view.endswith("_transverse"):
        _transverse_lobe(scene, rng, p, left=view.startswith("left"))
    else:
        _longitudinal_lobe(scene, rng, p)
    if view == "left_transverse":
        # Built like the right lobe, then mirrored: the left lobe has the trachea on the
        # image left.
        for name in ("refl", "atten", "specular", "reverb"):
            setattr(scene, name, np.ascontiguousarray(getattr(scene, name)[:, ::-1]))
    return SynthImage(view=view, pixels=_render(scene, rng, p))


def synth_patient(rng: np.random.Generator, label: str, size: int = 224) -> list[SynthImage]:
    """Five synthetic B-mode images of one patient, one per view in ``VIEWS``.

    Args:
        rng: the source of all randomness; the same generator state gives the same pixels.
        label: ``"autoimmune"`` or ``"normal"``.
        size: side of the square images in pixels (at least 32).

    Returns:
        ``SynthImage`` per view in ``VIEWS`` order, pixels uint8 of shape (size, size).

    Raises:
        ValueError: unknown label or too small a size.
    """
    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if not isinstance(size, int | np.integer) or size < 32:
        raise ValueError(f"size must be an integer of at least 32 pixels, got {size!r}")
    patient = _draw_patient(rng, label)
    return [_synth_view(rng, patient, view, int(size)) for view in VIEWS]
