/* sepsnet.eval._pq_native: the per-pixel loops of sepsnet-pq in C (optional; see pq_native.py).
 *
 * Plain CPython API and the buffer protocol (no numpy headers). Every function works on buffers the
 * caller allocated and checked, and releases the GIL for its loop, so threads run in parallel:
 *
 *   unfilter_ids(raw, y0, width, channels, out)       PNG scanline unfiltering (all five filter types
 *       of the PNG specification, section 9) of whole scanlines (rows y0.. of the image) fused with the
 *       COCO panoptic id conversion: out (H, W) uint32 gets R | G << 8 | B << 16 (| A << 24 for RGBA,
 *       which the caller masks off; grey: the value). Row y0 - 1 of out must already be decoded.
 *   boundary_band(ids, height, width, d, out, scratch)  the Boundary PQ band of an id map (boundary.py):
 *       non-uniform 2x2 blocks dilated by a 2d x 2d square (runs along rows, running counts down
 *       columns: O(1) per pixel for any d), plus a frame of d.
 *   count_pairs(gt, pred, gt_band, pred_band)         run-length (gt id, pred id[, band code]) pair counts
 *       in one pass with an open-addressing hash table; returns (gt ids, pred ids, counts) as bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- PNG unfilter + ids */

static inline uint8_t paeth(int a, int b, int c) {
    int p = a + b - c;
    int pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
    if (pa <= pb && pa <= pc) return (uint8_t)a;
    return (uint8_t)(pb <= pc ? b : c);
}

/* Grey (1 byte per pixel): one scanline, src filtered, prev the previous row's values (zeros
   for the first), cur the output; -1 for an unknown filter type */
static int unfilter_grey_row(int filter, const uint8_t *src, const uint32_t *prev, uint32_t *cur, Py_ssize_t n) {
    Py_ssize_t i;
    uint8_t left = 0;
    switch (filter) {
    case 0:
        for (i = 0; i < n; i++) cur[i] = src[i];
        return 0;
    case 1:
        for (i = 0; i < n; i++) cur[i] = left = (uint8_t)(src[i] + left);
        return 0;
    case 2:
        for (i = 0; i < n; i++) cur[i] = (uint8_t)(src[i] + prev[i]);
        return 0;
    case 3:
        for (i = 0; i < n; i++) cur[i] = left = (uint8_t)(src[i] + ((left + prev[i]) >> 1));
        return 0;
    case 4:
        for (i = 0; i < n; i++)
            cur[i] = left = (uint8_t)(src[i] + (i ? paeth(left, (int)prev[i], (int)prev[i - 1]) : (int)prev[i]));
        return 0;
    default:
        return -1;
    }
}

/* RGB / RGBA: a pixel is handled as one packed word b0 | b1 << 8 | b2 << 16 [| b3 << 24], and
   the per-byte arithmetic of the filters is done on all bytes of the word at once */
static inline uint32_t add_bytes(uint32_t a, uint32_t b) { /* bytewise (a + b) mod 256 */
    return ((a & 0x7f7f7f7fu) + (b & 0x7f7f7f7fu)) ^ ((a ^ b) & 0x80808080u);
}

static inline uint32_t mean_bytes(uint32_t a, uint32_t b) { /* bytewise floor((a + b) / 2) */
    return (a & b) + (((a ^ b) >> 1) & 0x7f7f7f7fu);
}

static inline uint32_t load_pixel(const uint8_t *p, int bpp) {
    uint32_t v = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16);
    return bpp == 4 ? v | ((uint32_t)p[3] << 24) : v;
}

/* Paeth predictor of every byte. Where left == upper-left it is the upper byte, where upper ==
   upper-left the left byte (true bytewise, so also for whole words): the usual case in
   piecewise-constant id maps. */
static inline uint32_t paeth_pixel(uint32_t a, uint32_t b, uint32_t c, int bpp) {
    if (a == c) return b;
    if (b == c) return a;
    uint32_t r = 0;
    for (int k = 0; k < 8 * bpp; k += 8)
        r |= (uint32_t)paeth((int)(a >> k) & 255, (int)(b >> k) & 255, (int)(c >> k) & 255) << k;
    return r;
}

/* the first index >= i of a nonzero byte of src[0:n] (n if none), 32 bytes at a time */
static inline Py_ssize_t zero_run_end(const uint8_t *src, Py_ssize_t i, Py_ssize_t n) {
    uint64_t word[4];
    for (; i + 32 <= n; i += 32) {
        memcpy(word, src + i, 32);
        if (word[0] | word[1] | word[2] | word[3]) break;
    }
    for (; i + 8 <= n; i += 8) {
        memcpy(word, src + i, 8);
        if (word[0]) break;
    }
    while (i < n && src[i] == 0) i++;
    return i;
}

static inline int unfilter_pixel_row(int filter, const uint8_t *src, const uint32_t *prev, uint32_t *cur,
                                     Py_ssize_t w, int bpp) {
    Py_ssize_t x;
    uint32_t left = 0, upleft = 0;
    switch (filter) {
    case 0:
        for (x = 0; x < w; x++) cur[x] = load_pixel(src + x * bpp, bpp);
        return 0;
    case 1: /* Sub: runs of zero differences repeat the left pixel */
        for (x = 0; x < w;) {
            Py_ssize_t next = zero_run_end(src, x * bpp, w * bpp) / bpp;
            for (; x < next; x++) cur[x] = left;
            if (x < w) {
                cur[x] = left = add_bytes(left, load_pixel(src + x * bpp, bpp));
                x++;
            }
        }
        return 0;
    case 2: /* Up: runs of zero differences repeat the row above */
        for (x = 0; x < w;) {
            Py_ssize_t next = zero_run_end(src, x * bpp, w * bpp) / bpp;
            memcpy(cur + x, prev + x, (size_t)(next - x) * sizeof(uint32_t));
            x = next;
            if (x < w) {
                cur[x] = add_bytes(load_pixel(src + x * bpp, bpp), prev[x]);
                x++;
            }
        }
        return 0;
    case 3:
        for (x = 0; x < w; x++) cur[x] = left = add_bytes(load_pixel(src + x * bpp, bpp), mean_bytes(left, prev[x]));
        return 0;
    case 4: /* Paeth: where left == upper-left the prediction is the upper pixel, so along zero
               differences the row repeats the row above from there on */
        for (x = 0; x < w;) {
            uint32_t s = load_pixel(src + x * bpp, bpp);
            if (s == 0 && left == upleft) {
                Py_ssize_t next = zero_run_end(src, x * bpp, w * bpp) / bpp;
                memcpy(cur + x, prev + x, (size_t)(next - x) * sizeof(uint32_t));
                left = upleft = prev[next - 1];
                x = next;
                continue;
            }
            uint32_t up = prev[x];
            cur[x] = left = add_bytes(s, paeth_pixel(left, up, upleft, bpp));
            upleft = up;
            x++;
        }
        return 0;
    default:
        return -1;
    }
}

/* rows of filtered scanlines into their id rows; the row above the first is `above` (zeros at the
   image top). Returns the index (within src) of the first row with an unknown filter type, or -1 */
static Py_ssize_t unfilter_rows(const uint8_t *src, Py_ssize_t rows, Py_ssize_t w, int bpp, const uint32_t *above,
                                uint32_t *out, int *bad_filter) {
    for (Py_ssize_t y = 0; y < rows; y++, src += w * bpp + 1, out += w) {
        const uint32_t *prev = y ? out - w : above;
        int rc = bpp == 1   ? unfilter_grey_row(src[0], src + 1, prev, out, w)
                 : bpp == 3 ? unfilter_pixel_row(src[0], src + 1, prev, out, w, 3) /* constant bpp: */
                            : unfilter_pixel_row(src[0], src + 1, prev, out, w, 4); /* inlined apart */
        if (rc != 0) {
            *bad_filter = src[0];
            return y;
        }
    }
    return -1;
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS) != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer", what, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

static PyObject *unfilter_ids(PyObject *self, PyObject *args) {
    PyObject *raw_obj, *out_obj;
    Py_ssize_t y0, w;
    int channels;
    if (!PyArg_ParseTuple(args, "OnniO", &raw_obj, &y0, &w, &channels, &out_obj)) return NULL;
    if (channels != 1 && channels != 3 && channels != 4) {
        PyErr_SetString(PyExc_ValueError, "channels must be 1, 3 or 4");
        return NULL;
    }
    Py_buffer raw, out;
    if (get_buffer(raw_obj, &raw, 0, "raw") != 0) return NULL;
    if (get_buffer(out_obj, &out, 1, "out") != 0) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    Py_ssize_t line = w * channels + 1, h = w > 0 ? out.len / (4 * w) : 0, rows = raw.len / line;
    if (w < 1 || y0 < 0 || out.len != h * w * 4 || raw.len != rows * line || y0 + rows > h) {
        PyBuffer_Release(&raw);
        PyBuffer_Release(&out);
        PyErr_Format(PyExc_ValueError, "unfilter_ids: %zd bytes are no whole scanlines of %zd pixels x %d bytes "
                     "for rows %zd.. of a %zd-row image", raw.len, w, channels, y0, h);
        return NULL;
    }
    uint32_t *zeros = (uint32_t *)calloc((size_t)w, sizeof(uint32_t));
    if (zeros == NULL) {
        PyBuffer_Release(&raw);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    Py_ssize_t bad_row;
    int bad_filter = 0;
    uint32_t *ids = (uint32_t *)out.buf + y0 * w;
    Py_BEGIN_ALLOW_THREADS
    bad_row = unfilter_rows((const uint8_t *)raw.buf, rows, w, channels, y0 ? ids - w : zeros, ids, &bad_filter);
    Py_END_ALLOW_THREADS
    free(zeros);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&out);
    if (bad_row >= 0) {
        PyErr_Format(PyExc_ValueError, "row %zd has the unknown PNG filter type %d", y0 + bad_row, bad_filter);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- Boundary PQ band */

/* edge (W) uint8: 1 at x when the 2x2 block with top-left (y, x) holds more than one id (row y of
   the non-uniform-block map; the last row and column have no block) */
#define EDGE_ROW(T)                                                                             \
    {                                                                                           \
        const T *restrict r0 = (const T *)ids + y * w, *restrict r1 = r0 + w;                   \
        for (Py_ssize_t x = 0; x + 1 < w; x++) {                                                \
            T a = r0[x];                                                                        \
            edge[x] = (uint8_t)((a != r0[x + 1]) | (a != r1[x]) | (a != r1[x + 1]));            \
        }                                                                                       \
    }

static void edge_row(const void *ids, int itemsize, Py_ssize_t y, Py_ssize_t h, Py_ssize_t w,
                     uint8_t *restrict edge) {
    memset(edge, 0, (size_t)w);
    if (y + 1 >= h) return;
    if (itemsize == 4) EDGE_ROW(uint32_t) else EDGE_ROW(uint64_t)
}

/* the first index >= i where src[i] != value (n if none); src holds only 0 and 1 */
static inline Py_ssize_t run_end(const uint8_t *src, Py_ssize_t i, Py_ssize_t n, uint8_t value) {
    uint64_t word[4], all = value ? 0x0101010101010101ULL : 0;
    for (; i + 32 <= n; i += 32) {
        memcpy(word, src + i, 32);
        if ((word[0] ^ all) | (word[1] ^ all) | (word[2] ^ all) | (word[3] ^ all)) break;
    }
    while (i < n && src[i] == value) i++;
    return i;
}

/* out[x] = 1 when any src[t] is set for t in [x - d, x + d - 1] (a 2d window anchored at d): each
   run [s, e] of set values marks [s - d + 1, e + d] */
static void window_any(const uint8_t *restrict src, uint8_t *restrict out, Py_ssize_t n, Py_ssize_t d) {
    memset(out, 0, (size_t)n);
    for (Py_ssize_t x = run_end(src, 0, n, 0); x < n; x = run_end(src, x, n, 0)) {
        Py_ssize_t e = run_end(src, x, n, 1);
        Py_ssize_t lo = x - d + 1 > 0 ? x - d + 1 : 0, hi = e - 1 + d < n ? e - 1 + d : n - 1;
        memset(out + lo, 1, (size_t)(hi - lo + 1));
        x = e;
    }
}

/* columns: per-column count of the set values of rows [y - d, y + d - 1], updated row by row (one
   row enters, one leaves) in one fused pass; T holds counts up to min(2d, h) */
#define COLUMN_PASS(T)                                                                          \
    {                                                                                           \
        T *restrict count = (T *)cols;                                                          \
        memset(count, 0, (size_t)w * sizeof(T));                                                \
        for (Py_ssize_t y = 0; y < d - 1 && y < h; y++) {                                       \
            const uint8_t *restrict in = rows + y * w;                                          \
            for (Py_ssize_t x = 0; x < w; x++) count[x] += in[x];                               \
        }                                                                                       \
        for (Py_ssize_t y = 0; y < h; y++) {                                                    \
            const uint8_t *restrict in = y + d - 1 < h ? rows + (y + d - 1) * w : zeros;         \
            const uint8_t *restrict gone = y - d - 1 >= 0 ? rows + (y - d - 1) * w : zeros;     \
            uint8_t *restrict o = band + y * w;                                                 \
            for (Py_ssize_t x = 0; x < w; x++) {                                                \
                count[x] = (T)(count[x] + in[x] - gone[x]);                                     \
                o[x] = count[x] != 0;                                                           \
            }                                                                                   \
        }                                                                                       \
    }

/* band = rows then columns of the 2d x 2d window over the non-uniform blocks, plus a frame of d */
static void band_of_ids(const void *ids, int itemsize, Py_ssize_t h, Py_ssize_t w, Py_ssize_t d,
                        uint8_t *restrict band, uint8_t *restrict rows, uint8_t *restrict edge,
                        void *restrict cols) {
    for (Py_ssize_t y = 0; y < h; y++) {
        edge_row(ids, itemsize, y, h, w, edge);
        window_any(edge, rows + y * w, w, d);
    }
    const uint8_t *zeros = edge; /* the last edge row is all zeros (it has no blocks) */
    if ((2 * d < h ? 2 * d : h) <= 65535)
        COLUMN_PASS(uint16_t)
    else
        COLUMN_PASS(int32_t)
    for (Py_ssize_t y = 0; y < h; y++) { /* the frame */
        uint8_t *o = band + y * w;
        if (y < d || y >= h - d) {
            memset(o, 1, (size_t)w);
        } else {
            memset(o, 1, (size_t)(d < w ? d : w));
            if (w > d) memset(o + w - d, 1, (size_t)d);
        }
    }
}

static PyObject *boundary_band(PyObject *self, PyObject *args) {
    PyObject *ids_obj, *out_obj, *rows_obj;
    Py_ssize_t h, w, d;
    if (!PyArg_ParseTuple(args, "OnnnOO", &ids_obj, &h, &w, &d, &out_obj, &rows_obj)) return NULL;
    Py_buffer ids, out, rows;
    if (get_buffer(ids_obj, &ids, 0, "ids") != 0) return NULL;
    if (get_buffer(out_obj, &out, 1, "out") != 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    if (get_buffer(rows_obj, &rows, 1, "scratch") != 0) {
        PyBuffer_Release(&ids);
        PyBuffer_Release(&out);
        return NULL;
    }
    int itemsize = (int)ids.itemsize;
    int ok = h >= 0 && w >= 0 && d >= 1 && (itemsize == 4 || itemsize == 8) && ids.len == h * w * itemsize &&
             out.len == h * w && rows.len == h * w;
    uint8_t *edge = NULL;
    void *cols = NULL;
    if (ok) {
        edge = (uint8_t *)malloc((size_t)w + 1);
        cols = malloc(((size_t)w + 1) * sizeof(int32_t));
    }
    if (ok && edge != NULL && cols != NULL) {
        Py_BEGIN_ALLOW_THREADS
        band_of_ids(ids.buf, itemsize, h, w, d, (uint8_t *)out.buf, (uint8_t *)rows.buf, edge, cols);
        Py_END_ALLOW_THREADS
    }
    int oom = ok && (edge == NULL || cols == NULL);
    free(edge);
    free(cols);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
    PyBuffer_Release(&rows);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError,
                        "boundary_band: needs 4- or 8-byte (H, W) ids, d >= 1, (H, W) uint8 out and scratch");
        return NULL;
    }
    if (oom) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- pair counting */

typedef struct {
    uint64_t *gt, *pred;
    int64_t *counts; /* n_codes per entry */
    Py_ssize_t n, cap;
    int32_t *slots; /* index into the entries, -1 empty */
    Py_ssize_t n_slots; /* power of two */
    int n_codes;
} PairTable;

static inline uint64_t mix(uint64_t g, uint64_t p) {
    uint64_t k = g * 0x9E3779B97F4A7C15ULL ^ (p + 0x632BE59BD9B4E019ULL + (g << 6) + (g >> 2));
    k ^= k >> 31;
    k *= 0xBF58476D1CE4E5B9ULL;
    return k ^ (k >> 29);
}

static int table_init(PairTable *t, int n_codes) {
    t->n = 0;
    t->cap = 256;
    t->n_slots = 1024;
    t->n_codes = n_codes;
    t->gt = (uint64_t *)malloc((size_t)t->cap * sizeof(uint64_t));
    t->pred = (uint64_t *)malloc((size_t)t->cap * sizeof(uint64_t));
    t->counts = (int64_t *)calloc((size_t)(t->cap * n_codes), sizeof(int64_t));
    t->slots = (int32_t *)malloc((size_t)t->n_slots * sizeof(int32_t));
    if (!t->gt || !t->pred || !t->counts || !t->slots) return -1;
    memset(t->slots, 0xff, (size_t)t->n_slots * sizeof(int32_t));
    return 0;
}

static void table_free(PairTable *t) {
    free(t->gt);
    free(t->pred);
    free(t->counts);
    free(t->slots);
}

static int table_grow_slots(PairTable *t) {
    Py_ssize_t n_slots = t->n_slots * 2;
    int32_t *slots = (int32_t *)malloc((size_t)n_slots * sizeof(int32_t));
    if (!slots) return -1;
    memset(slots, 0xff, (size_t)n_slots * sizeof(int32_t));
    for (Py_ssize_t i = 0; i < t->n; i++) {
        Py_ssize_t s = (Py_ssize_t)(mix(t->gt[i], t->pred[i]) & (uint64_t)(n_slots - 1));
        while (slots[s] >= 0) s = (s + 1) & (n_slots - 1);
        slots[s] = (int32_t)i;
    }
    free(t->slots);
    t->slots = slots;
    t->n_slots = n_slots;
    return 0;
}

/* the entry of (g, p), added with zero counts when new; -1 when out of memory */
static Py_ssize_t table_entry(PairTable *t, uint64_t g, uint64_t p) {
    Py_ssize_t s = (Py_ssize_t)(mix(g, p) & (uint64_t)(t->n_slots - 1));
    while (t->slots[s] >= 0) {
        Py_ssize_t i = t->slots[s];
        if (t->gt[i] == g && t->pred[i] == p) return i;
        s = (s + 1) & (t->n_slots - 1);
    }
    if (t->n == t->cap) {
        Py_ssize_t cap = t->cap * 2;
        uint64_t *gt = (uint64_t *)realloc(t->gt, (size_t)cap * sizeof(uint64_t));
        if (gt) t->gt = gt;
        uint64_t *pred = (uint64_t *)realloc(t->pred, (size_t)cap * sizeof(uint64_t));
        if (pred) t->pred = pred;
        int64_t *counts = (int64_t *)realloc(t->counts, (size_t)(cap * t->n_codes) * sizeof(int64_t));
        if (counts) t->counts = counts;
        if (!gt || !pred || !counts || cap > INT32_MAX) return -1;
        memset(t->counts + t->cap * t->n_codes, 0, (size_t)((cap - t->cap) * t->n_codes) * sizeof(int64_t));
        t->cap = cap;
    }
    Py_ssize_t i = t->n++;
    t->gt[i] = g;
    t->pred[i] = p;
    t->slots[s] = (int32_t)i;
    if (2 * t->n > t->n_slots && table_grow_slots(t) != 0) return -1;
    return i;
}

/* the end of the run of pixels equal to pixel i in gt, pred and (when given) both bands: the first
   j > i that differs. 32-bit ids: 8 (with bands 4) pixels per step, compared as 64-bit words. */
static inline Py_ssize_t run_end_u32(const uint32_t *G, const uint32_t *P, const uint8_t *gb, const uint8_t *pb,
                                     Py_ssize_t i, Py_ssize_t n) {
    const uint32_t g = G[i], p = P[i];
    const uint64_t gg = g * 0x100000001ULL, pp = p * 0x100000001ULL;
    Py_ssize_t j = i + 1;
    uint64_t a[4], b[4];
    if (gb) {
        const uint8_t cg = gb[i], cp = pb[i];
        const uint32_t cgg = cg * 0x01010101u, cpp = cp * 0x01010101u;
        uint32_t x, y;
        for (; j + 4 <= n; j += 4) {
            memcpy(a, G + j, 16);
            memcpy(b, P + j, 16);
            memcpy(&x, gb + j, 4);
            memcpy(&y, pb + j, 4);
            if ((a[0] ^ gg) | (a[1] ^ gg) | (b[0] ^ pp) | (b[1] ^ pp) | (uint64_t)((x ^ cgg) | (y ^ cpp))) break;
        }
        while (j < n && G[j] == g && P[j] == p && gb[j] == cg && pb[j] == cp) j++;
    } else {
        for (; j + 8 <= n; j += 8) {
            memcpy(a, G + j, 32);
            memcpy(b, P + j, 32);
            if ((a[0] ^ gg) | (a[1] ^ gg) | (a[2] ^ gg) | (a[3] ^ gg) | (b[0] ^ pp) | (b[1] ^ pp) | (b[2] ^ pp) |
                (b[3] ^ pp))
                break;
        }
        while (j < n && G[j] == g && P[j] == p) j++;
    }
    return j;
}

static inline Py_ssize_t run_end_u64(const uint64_t *G, const uint64_t *P, const uint8_t *gb, const uint8_t *pb,
                                     Py_ssize_t i, Py_ssize_t n) {
    const uint64_t g = G[i], p = P[i];
    Py_ssize_t j = i + 1;
    if (gb) {
        while (j < n && G[j] == g && P[j] == p && gb[j] == gb[i] && pb[j] == pb[i]) j++;
    } else {
        while (j < n && G[j] == g && P[j] == p) j++;
    }
    return j;
}

/* all runs; one table look-up per run (none while the pair stays the same) */
#define COUNT_RUNS(T, RUN_END)                                                                  \
    {                                                                                           \
        const T *G = (const T *)gt_buf, *P = (const T *)pred_buf;                               \
        T last_g = 0, last_p = 0;                                                               \
        for (Py_ssize_t i = 0, j; i < n; i = j) {                                               \
            j = RUN_END(G, P, gb, pb, i, n);                                                    \
            if (G[i] != last_g || P[i] != last_p || last < 0) {                                  \
                last = table_entry(&t, (uint64_t)G[i], (uint64_t)P[i]);                         \
                if (last < 0) {                                                                 \
                    oom = 1;                                                                    \
                    break;                                                                      \
                }                                                                               \
                last_g = G[i];                                                                  \
                last_p = P[i];                                                                  \
            }                                                                                   \
            int code = gb ? (gb[i] != 0) | ((pb[i] != 0) << 1) : 0;                             \
            t.counts[last * n_codes + code] += j - i;                                           \
        }                                                                                       \
    }

static PyObject *count_pairs(PyObject *self, PyObject *args) {
    PyObject *gt_obj, *pred_obj, *gb_obj = Py_None, *pb_obj = Py_None;
    if (!PyArg_ParseTuple(args, "OO|OO", &gt_obj, &pred_obj, &gb_obj, &pb_obj)) return NULL;
    Py_buffer gtv, predv, gbv, pbv;
    int with_band = gb_obj != Py_None;
    if (with_band != (pb_obj != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "count_pairs: give both band maps or neither");
        return NULL;
    }
    if (get_buffer(gt_obj, &gtv, 0, "gt") != 0) return NULL;
    if (get_buffer(pred_obj, &predv, 0, "pred") != 0) {
        PyBuffer_Release(&gtv);
        return NULL;
    }
    int nbuf = 2;
    if (with_band) {
        if (get_buffer(gb_obj, &gbv, 0, "gt_band") != 0) goto release;
        nbuf = 3;
        if (get_buffer(pb_obj, &pbv, 0, "pred_band") != 0) goto release;
        nbuf = 4;
    }
    int itemsize = (int)gtv.itemsize;
    Py_ssize_t n = itemsize ? gtv.len / itemsize : 0;
    if ((itemsize != 4 && itemsize != 8) || predv.itemsize != itemsize || predv.len != gtv.len ||
        (with_band && (gbv.len != n || pbv.len != n))) {
        PyErr_SetString(PyExc_ValueError,
                        "count_pairs: gt and pred need one 4- or 8-byte item type and one size, bands 1 byte each");
        goto release;
    }
    int n_codes = with_band ? 4 : 1;
    PairTable t;
    if (table_init(&t, n_codes) != 0) {
        table_free(&t);
        PyErr_NoMemory();
        goto release;
    }
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
    const void *gt_buf = gtv.buf, *pred_buf = predv.buf;
    const uint8_t *gb = with_band ? (const uint8_t *)gbv.buf : NULL;
    const uint8_t *pb = with_band ? (const uint8_t *)pbv.buf : NULL;
    Py_ssize_t last = -1;
    if (itemsize == 4)
        COUNT_RUNS(uint32_t, run_end_u32)
    else
        COUNT_RUNS(uint64_t, run_end_u64)
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (oom) {
        PyErr_NoMemory();
    } else {
        result = Py_BuildValue("(y#y#y#)", (const char *)t.gt, (Py_ssize_t)(t.n * 8), (const char *)t.pred,
                               (Py_ssize_t)(t.n * 8), (const char *)t.counts,
                               (Py_ssize_t)(t.n * n_codes * 8));
    }
    table_free(&t);
    for (int b = 0; b < nbuf; b++) PyBuffer_Release(b == 0 ? &gtv : b == 1 ? &predv : b == 2 ? &gbv : &pbv);
    return result;
release:
    for (int b = 0; b < nbuf; b++) PyBuffer_Release(b == 0 ? &gtv : b == 1 ? &predv : b == 2 ? &gbv : &pbv);
    return NULL;
}

static PyMethodDef methods[] = {
    {"unfilter_ids", unfilter_ids, METH_VARARGS,
     "unfilter_ids(raw, y0, width, channels, out): PNG unfilter of whole scanlines into rows y0.. of the "
     "uint32 (H, W) out (R | G << 8 | B << 16 | A << 24; GIL released)."},
    {"boundary_band", boundary_band, METH_VARARGS,
     "boundary_band(ids, height, width, d, out, scratch): Boundary PQ band of an id map into uint8 out "
     "(scratch: (H, W) uint8 work memory)."},
    {"count_pairs", count_pairs, METH_VARARGS,
     "count_pairs(gt, pred[, gt_band, pred_band]) -> (gt ids, pred ids, counts) as bytes of uint64/int64."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pq_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pq_native(void) { return PyModule_Create(&module); }
