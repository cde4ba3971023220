"""The FFT behind the ``bands`` feature of ``window_features``: radix-2, in numba, tables per width.

np.fft is not available in numba. :func:`half_spectrum_power` packs a real signal of length m
into an m/2-point complex FFT; :func:`fft_inplace` is an iterative decimation-in-time radix-2
FFT whose input the caller has already put in bit-reversed order. :func:`half_spectrum_power_of`
takes the signal in natural order instead (``window_features`` writes the mean-removed samples
to a plain array while it sums the central moments): its first pass reads the points at their
bit-reversed places itself, so the permutation costs no pass and no scattered stores of its own.
:func:`fft_tables` holds everything that depends only on the size: per-stage twiddles and the
bit-reversal permutation; the device keeps one per window width (``kernels.twiddles_for``).

Numeric contract: every butterfly is the textbook one, (a + w*b, a - w*b) with
w*b = (wr*br - wi*bi) + i*(wr*bi + wi*br), stage by stage, with twiddles copied from one cosine
table (:func:`twiddles`), and fastmath is off. So the result does not depend on how the stages
are grouped into passes nor on where the input is read from: it is the plain textbook loop's,
value for value (the tests check it against ``reference.fft_radix2``, and
half_spectrum_power_of against half_spectrum_power); only libm's cos is platform-dependent.

Speed notes (numba 0.68 on an x86-64 VM with AVX-512 (AMD Zen 5); 512-point FFT, the size a
1024-sample window needs, with h known only at run time as in ``window_features``): about
1.2 µs with the gathered first pass, against about 2.2 µs for this module's earlier schedule
(bit-reversed writes, stages after the first three fused two at a time in a loop) and about 4
µs for the textbook loop with a strided twiddle table.

- numba wraps negative indices (``x[-1]`` is the last item) with a compare and select on every
  access, which LLVM drops only where it can prove an index non-negative. With a loop bound that
  is not a compile-time constant it cannot, and then it does not vectorise these loops at all
  (2.5x slower). ``i & _NONNEG`` proves it, for one AND.
- Stages with half = 1, 2 and 4 have butterflies too short to vectorise; they run as one scalar
  pass over groups of 8 points, where the twiddles 1 and -i need no multiplication.
- Stages with half = 8 and 16 go two at a time (four points in registers per step: half the
  loads and stores). LLVM does not vectorise that loop (it would need too many run-time alias
  checks between the four positions), yet it measured as fast as two single stages there.
- From half = 32 (``_VECTOR_HALF``) on, one vectorised pass per stage is about 3x faster than
  the fused pair. Each of those stages is a call of its own with its half as a literal
  (:func:`_stages_from`): the same stages in one loop over ``half`` measured 2-3x slower.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = [
    "FFTTables",
    "fft_inplace",
    "fft_tables",
    "half_spectrum_power",
    "half_spectrum_power_of",
    "twiddles",
]

_jit = numba.njit(cache=True, fastmath=False, nogil=True)

# (w_re, w_im, rev): see fft_tables.
FFTTables = tuple[np.ndarray, np.ndarray, np.ndarray]

# Masking the sign bit off an index tells LLVM it is non-negative (see the module docstring).
_NONNEG = (1 << 63) - 1

# From this half on, a stage's butterfly loop is long enough for LLVM to vectorise, and one
# vectorised pass per stage beats the fused scalar pass of _two_stages (see the module docstring).
_VECTOR_HALF = 32


@_jit
def twiddles(table_n: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2*pi*k/table_n for k < table_n // 2, from one quarter-wave of cosines.

    The symmetries make the table exactly symmetric (sin(pi/2) is exactly 1, cos(pi/2)
    exactly 0) and cost a quarter of the trig calls of the direct table.
    """
    half = table_n // 2
    cos_t = np.empty(half)
    sin_t = np.empty(half)
    if table_n < 4:
        if half == 1:
            cos_t[0] = 1.0
            sin_t[0] = 0.0
        return cos_t, sin_t
    quarter = table_n // 4
    wave = np.empty(quarter + 1)
    for k in range(quarter):
        wave[k] = math.cos(2.0 * math.pi * k / table_n)
    wave[quarter] = 0.0
    for k in range(half):
        if k <= quarter:
            cos_t[k] = wave[k]
            sin_t[k] = wave[quarter - k]
        else:
            cos_t[k] = -wave[half - k]
            sin_t[k] = wave[k - quarter]
    return cos_t, sin_t


@_jit
def fft_tables(table_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-stage twiddles and the bit-reversal permutation for FFTs of up to table_n // 2 points.

    table_n is a power of two (the padded length of a real signal). ``w_re[h + k] + i*w_im[h +
    k]`` is exp(-2*pi*i*k / (2*h)) for h = 1, 2, 4, .. table_n // 2 and k < h: the twiddles of
    the stage that merges DFTs of h points, contiguous so that the stage reads them in order.
    They are copies of :func:`twiddles` (cos and -sin of 2*pi*k*(table_n // (2*h)) / table_n).
    ``rev`` is the bit-reversal permutation of range(table_n // 2); for an FFT of h points,
    ``rev[j] >> s`` with h << s == table_n // 2 is that of range(h).
    """
    cos_t, sin_t = twiddles(table_n)
    w_re = np.zeros(max(table_n, 2))
    w_im = np.zeros(max(table_n, 2))
    half = 1
    while half < table_n:
        step = table_n // (2 * half)
        for k in range(half):
            w_re[half + k] = cos_t[k * step]
            w_im[half + k] = -sin_t[k * step]
        half *= 2
    points = table_n // 2
    rev = np.zeros(max(points, 1), dtype=np.int64)
    top = points >> 1
    for j in range(1, points):
        # Reversed j = reversed (j >> 1) moved down one bit, with j's lowest bit on top.
        rev[j] = (rev[j >> 1] >> 1) | (top if j & 1 else 0)
    return w_re, w_im, rev


@_jit
def _butterfly(ar: float, ai: float, br: float, bi: float, wr: float,
               wi: float) -> tuple[float, float, float, float]:
    """(a + w*b, a - w*b), in the one operation order every stage uses."""
    tr = wr * br - wi * bi
    ti = wr * bi + wi * br
    return ar + tr, ai + ti, ar - tr, ai - ti


@_jit
def _radix8(re: np.ndarray, im: np.ndarray, g: int, xr: tuple[float, ...], xi: tuple[float, ...],
            w1r: float, w1i: float, w3r: float, w3i: float) -> None:
    """The stages with half = 1, 2 and 4 on the 8 points xr + i*xi, stored to re/im[g:g + 8].

    Their twiddles 1 and -i make the butterfly an exact addition or subtraction, the values the
    general butterfly gives (up to the sign of a zero); w8 and w8^3 (45 and 135 degrees), passed
    as w1 and w3, get the general butterfly.
    """
    # half = 1, twiddle 1: pairs (0, 1), (2, 3), (4, 5), (6, 7).
    r0 = xr[0] + xr[1]
    i0 = xi[0] + xi[1]
    r1 = xr[0] - xr[1]
    i1 = xi[0] - xi[1]
    r2 = xr[2] + xr[3]
    i2 = xi[2] + xi[3]
    r3 = xr[2] - xr[3]
    i3 = xi[2] - xi[3]
    r4 = xr[4] + xr[5]
    i4 = xi[4] + xi[5]
    r5 = xr[4] - xr[5]
    i5 = xi[4] - xi[5]
    r6 = xr[6] + xr[7]
    i6 = xi[6] + xi[7]
    r7 = xr[6] - xr[7]
    i7 = xi[6] - xi[7]
    # half = 2: twiddle 1 on (0, 2) and (4, 6); -i on (1, 3) and (5, 7): -i*(x + iy) = y - ix.
    s0r = r0 + r2
    s0i = i0 + i2
    s2r = r0 - r2
    s2i = i0 - i2
    s1r = r1 + i3
    s1i = i1 - r3
    s3r = r1 - i3
    s3i = i1 + r3
    s4r = r4 + r6
    s4i = i4 + i6
    s6r = r4 - r6
    s6i = i4 - i6
    s5r = r5 + i7
    s5i = i5 - r7
    s7r = r5 - i7
    s7i = i5 + r7
    # half = 4: twiddles 1, w8, -i, w8^3 on (0, 4), (1, 5), (2, 6), (3, 7).
    re[g] = s0r + s4r
    im[g] = s0i + s4i
    re[g + 4] = s0r - s4r
    im[g + 4] = s0i - s4i
    re[g + 1], im[g + 1], re[g + 5], im[g + 5] = _butterfly(s1r, s1i, s5r, s5i, w1r, w1i)
    re[g + 2] = s2r + s6i
    im[g + 2] = s2i - s6r
    re[g + 6] = s2r - s6i
    im[g + 6] = s2i + s6r
    re[g + 3], im[g + 3], re[g + 7], im[g + 7] = _butterfly(s3r, s3i, s7r, s7i, w3r, w3i)


@_jit
def _first_three_stages(re: np.ndarray, im: np.ndarray, h: int, w_re: np.ndarray,
                        w_im: np.ndarray) -> None:
    """The stages with half = 1, 2 and 4, in one pass over groups of 8 points (h >= 8)."""
    for g in range(0, h, 8):
        g = g & _NONNEG
        xr = (re[g], re[g + 1], re[g + 2], re[g + 3], re[g + 4], re[g + 5], re[g + 6], re[g + 7])
        xi = (im[g], im[g + 1], im[g + 2], im[g + 3], im[g + 4], im[g + 5], im[g + 6], im[g + 7])
        _radix8(re, im, g, xr, xi, w_re[5], w_im[5], w_re[7], w_im[7])


@_jit
def _first_three_stages_gathered(d: np.ndarray, rev: np.ndarray, shift: int, re: np.ndarray,
                                 im: np.ndarray, h: int, w_re: np.ndarray,
                                 w_im: np.ndarray) -> None:
    """:func:`_first_three_stages` reading its input from d in natural order (h >= 8).

    Point q of the bit-reversed input is z_j = d[2j] + i*d[2j + 1] for j = rev[q] >> shift
    (the permutation is its own inverse), so the gather replaces the permutation's pass. For g
    a multiple of 8 and k < 8 the bits of g and k do not overlap, so the reversal of g + k is
    that of g plus that of k: one table look-up per group.
    """
    o1 = 2 * ((rev[1] >> shift) & _NONNEG)
    o2 = 2 * ((rev[2] >> shift) & _NONNEG)
    o3 = 2 * ((rev[3] >> shift) & _NONNEG)
    o4 = 2 * ((rev[4] >> shift) & _NONNEG)
    o5 = 2 * ((rev[5] >> shift) & _NONNEG)
    o6 = 2 * ((rev[6] >> shift) & _NONNEG)
    o7 = 2 * ((rev[7] >> shift) & _NONNEG)
    for g in range(0, h, 8):
        g = g & _NONNEG
        j0 = 2 * ((rev[g] >> shift) & _NONNEG)
        j1 = (j0 + o1) & _NONNEG
        j2 = (j0 + o2) & _NONNEG
        j3 = (j0 + o3) & _NONNEG
        j4 = (j0 + o4) & _NONNEG
        j5 = (j0 + o5) & _NONNEG
        j6 = (j0 + o6) & _NONNEG
        j7 = (j0 + o7) & _NONNEG
        xr = (d[j0], d[j1], d[j2], d[j3], d[j4], d[j5], d[j6], d[j7])
        xi = (d[j0 + 1], d[j1 + 1], d[j2 + 1], d[j3 + 1], d[j4 + 1], d[j5 + 1], d[j6 + 1],
              d[j7 + 1])
        _radix8(re, im, g, xr, xi, w_re[5], w_im[5], w_re[7], w_im[7])


@_jit
def _stage(re: np.ndarray, im: np.ndarray, h: int, half: int, w_re: np.ndarray,
           w_im: np.ndarray) -> None:
    """One stage: merge pairs of half-point DFTs with the butterflies (g + k, g + k + half)."""
    for g in range(0, h, 2 * half):
        for k in range(half):
            a = (g + k) & _NONNEG
            b = (a + half) & _NONNEG
            w = (half + k) & _NONNEG
            re[a], im[a], re[b], im[b] = _butterfly(re[a], im[a], re[b], im[b], w_re[w], w_im[w])


@_jit
def _two_stages(re: np.ndarray, im: np.ndarray, h: int, half: int, w_re: np.ndarray,
                w_im: np.ndarray) -> None:
    """The stages ``half`` and ``2 * half`` in one pass: the same butterflies as two passes.

    Each step loads the four points (g + k + j * half, j < 4) that two butterflies of stage
    ``half`` and then two of stage ``2 * half`` combine, and stores them once.
    """
    for g in range(0, h, 4 * half):
        for k in range(half):
            i0 = (g + k) & _NONNEG
            i1 = (i0 + half) & _NONNEG
            i2 = (i1 + half) & _NONNEG
            i3 = (i2 + half) & _NONNEG
            w1 = (half + k) & _NONNEG
            w2 = (2 * half + k) & _NONNEG
            w3 = (w2 + half) & _NONNEG
            r0, j0, r1, j1 = _butterfly(re[i0], im[i0], re[i1], im[i1], w_re[w1], w_im[w1])
            r2, j2, r3, j3 = _butterfly(re[i2], im[i2], re[i3], im[i3], w_re[w1], w_im[w1])
            re[i0], im[i0], re[i2], im[i2] = _butterfly(r0, j0, r2, j2, w_re[w2], w_im[w2])
            re[i1], im[i1], re[i3], im[i3] = _butterfly(r1, j1, r3, j3, w_re[w3], w_im[w3])


@_jit
def _stages_from(re: np.ndarray, im: np.ndarray, h: int, half: int, w_re: np.ndarray,
                 w_im: np.ndarray) -> None:
    """The stages half, 2 * half, .. h // 2 (the earlier ones are done).

    The stages with half = 32 .. 4096 are written out one call each with their half as a
    literal, so LLVM compiles each for its own size: twice as fast as one loop over the stages.
    """
    while 4 * half <= h and half < _VECTOR_HALF:
        _two_stages(re, im, h, half, w_re, w_im)
        half *= 4
    if half == 32 and half < h:
        _stage(re, im, h, 32, w_re, w_im)
        half = 64
    if half == 64 and half < h:
        _stage(re, im, h, 64, w_re, w_im)
        half = 128
    if half == 128 and half < h:
        _stage(re, im, h, 128, w_re, w_im)
        half = 256
    if half == 256 and half < h:
        _stage(re, im, h, 256, w_re, w_im)
        half = 512
    if half == 512 and half < h:
        _stage(re, im, h, 512, w_re, w_im)
        half = 1024
    if half == 1024 and half < h:
        _stage(re, im, h, 1024, w_re, w_im)
        half = 2048
    if half == 2048 and half < h:
        _stage(re, im, h, 2048, w_re, w_im)
        half = 4096
    if half == 4096 and half < h:
        _stage(re, im, h, 4096, w_re, w_im)
        half = 8192
    while half < h:
        _stage(re, im, h, half, w_re, w_im)
        half *= 2


@_jit
def fft_inplace(re: np.ndarray, im: np.ndarray, h: int, w_re: np.ndarray,
                w_im: np.ndarray) -> None:
    """Forward FFT of re/im[:h] in place; the input is in bit-reversed order, the output is not.

    h is a power of two, at most table_n // 2 of the tables w_re/w_im come from.
    """
    half = 1
    if h >= 8:
        _first_three_stages(re, im, h, w_re, w_im)
        half = 8
    _stages_from(re, im, h, half, w_re, w_im)


@_jit
def _power_from_fft(h: int, re: np.ndarray, im: np.ndarray, power: np.ndarray,
                    w_re: np.ndarray, w_im: np.ndarray) -> None:
    """power[k] = |X_k|^2 for k = 1..h from Z = re + i*im, the h-point FFT of the packed signal.

    X_k is split back out of Z_k and Z_{h-k}.
    """
    for k in range(1, h):
        r = (h - k) & _NONNEG
        zr = re[k]
        zi = im[k]
        cr = re[r]
        ci = -im[r]
        er = 0.5 * (zr + cr)
        ei = 0.5 * (zi + ci)
        o_r = 0.5 * (zi - ci)  # O = (Z_k - conj(Z_{h-k})) / 2i
        o_i = -0.5 * (zr - cr)
        w = (h + k) & _NONNEG
        c = w_re[w]  # cos(2*pi*k / 2h)
        s = -w_im[w]  # sin(2*pi*k / 2h)
        xr = er + c * o_r + s * o_i
        xi = ei + c * o_i - s * o_r
        power[k] = xr * xr + xi * xi
    nyquist = re[0] - im[0]
    power[h] = nyquist * nyquist


@_jit
def half_spectrum_power(h: int, re: np.ndarray, im: np.ndarray, power: np.ndarray,
                        w_re: np.ndarray, w_im: np.ndarray) -> None:
    """power[k] = |X_k|^2 for k = 1..h, X the 2h-point DFT of a real signal d (h >= 1).

    On entry re/im[:h] hold z_j = d_2j + i*d_2j+1 in bit-reversed order, so one h-point complex
    FFT does the work; X_k is then split back out of Z_k and Z_{h-k}. re/im are overwritten.
    """
    fft_inplace(re, im, h, w_re, w_im)
    _power_from_fft(h, re, im, power, w_re, w_im)


@_jit
def half_spectrum_power_of(d: np.ndarray, h: int, rev: np.ndarray, re: np.ndarray,
                           im: np.ndarray, power: np.ndarray, w_re: np.ndarray,
                           w_im: np.ndarray) -> None:
    """:func:`half_spectrum_power` of the real signal d[:2h] given in natural order.

    ``rev`` is the tables' bit-reversal permutation (of range(len(rev)), len(rev) >= h); re/im
    (at least h values each) are scratch. The first pass reads d at bit-reversed positions
    itself, so nobody writes the permuted input; the values are those of half_spectrum_power.
    """
    shift = 0
    while (h << shift) < rev.shape[0]:
        shift += 1
    if h >= 8:
        _first_three_stages_gathered(d, rev, shift, re, im, h, w_re, w_im)
        _stages_from(re, im, h, 8, w_re, w_im)
    else:
        for q in range(h):
            j = 2 * ((rev[q] >> shift) & _NONNEG)
            re[q] = d[j]
            im[q] = d[j + 1]
        fft_inplace(re, im, h, w_re, w_im)
    _power_from_fft(h, re, im, power, w_re, w_im)
