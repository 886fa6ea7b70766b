/* sepsnet.eval._pq_native: the per-pixel loops of sepsnet-pq in C (optional; see pq_native.py).
 *
 * Plain CPython API and the buffer protocol (no numpy headers). Every function works on buffers the
 * caller allocated and checked, and releases the GIL for its loop, so threads run in parallel:
 *
 *   unfilter_ids(raw, height, width, channels, out)   PNG scanline unfiltering (all five filter types
 *       of the PNG specification, section 9) fused with the COCO panoptic id conversion
 *       id = R | G << 8 | B << 16 (grey: id = value) into a uint32 (H, W) buffer.
 *   boundary_band(ids, height, width, d, out)         the Boundary PQ band of an id map (boundary.py):
 *       non-uniform 2x2 blocks dilated by a 2d x 2d square (box counts: O(1) per pixel), plus a frame of d.
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

/* Grey (1 byte per pixel): one scanline, src filtered, prev the previous unfiltered row (zeros
   for the first), cur the output; -1 for an unknown filter type */
static int unfilter_grey_row(int filter, const uint8_t *src, const uint8_t *prev, uint8_t *cur, Py_ssize_t n) {
    Py_ssize_t i;
    switch (filter) {
    case 0:
        memcpy(cur, src, (size_t)n);
        return 0;
    case 1:
        for (i = 0; i < n; i++) cur[i] = (uint8_t)(src[i] + (i ? cur[i - 1] : 0));
        return 0;
    case 2:
        for (i = 0; i < n; i++) cur[i] = (uint8_t)(src[i] + prev[i]);
        return 0;
    case 3:
        for (i = 0; i < n; i++) cur[i] = (uint8_t)(src[i] + (((i ? cur[i - 1] : 0) + prev[i]) >> 1));
        return 0;
    case 4:
        for (i = 0; i < n; i++)
            cur[i] = (uint8_t)(src[i] + (i ? paeth(cur[i - 1], prev[i], prev[i - 1]) : prev[i]));
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

/* the first index >= i of a nonzero byte of src[0:n] (n if none), 8 bytes at a time */
static inline Py_ssize_t zero_run_end(const uint8_t *src, Py_ssize_t i, Py_ssize_t n) {
    uint64_t word;
    for (; i + 8 <= n; i += 8) {
        memcpy(&word, src + i, 8);
        if (word) break;
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
    case 4:
        for (x = 0; x < w; x++) {
            uint32_t up = prev[x];
            cur[x] = left = add_bytes(load_pixel(src + x * bpp, bpp), paeth_pixel(left, up, upleft, bpp));
            upleft = up;
        }
        return 0;
    default:
        return -1;
    }
}

/* all rows; returns the first row with an unknown filter type, or -1 */
static Py_ssize_t unfilter_image(const uint8_t *src, Py_ssize_t h, Py_ssize_t w, int bpp, uint32_t *out,
                                 void *scratch, int *bad_filter) {
    Py_ssize_t rowbytes = w * bpp;
    for (Py_ssize_t y = 0; y < h; y++, src += rowbytes + 1, out += w) {
        int filter = src[0], rc;
        if (bpp == 1) {
            uint8_t *prev = (uint8_t *)scratch + (y & 1) * w, *cur = (uint8_t *)scratch + (~y & 1) * w;
            rc = unfilter_grey_row(filter, src + 1, prev, cur, w);
            for (Py_ssize_t x = 0; x < w && rc == 0; x++) out[x] = cur[x];
        } else if (bpp == 3) { /* the packed row is the id row: the previous output row is prev */
            rc = unfilter_pixel_row(filter, src + 1, y ? out - w : (const uint32_t *)scratch, out, w, 3);
        } else {
            uint32_t *prev = (uint32_t *)scratch + (y & 1) * w, *cur = (uint32_t *)scratch + (~y & 1) * w;
            rc = unfilter_pixel_row(filter, src + 1, prev, cur, w, 4);
            for (Py_ssize_t x = 0; x < w && rc == 0; x++) out[x] = cur[x] & 0xFFFFFFu;
        }
        if (rc != 0) {
            *bad_filter = filter;
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
    Py_ssize_t h, w;
    int channels;
    if (!PyArg_ParseTuple(args, "OnniO", &raw_obj, &h, &w, &channels, &out_obj)) return NULL;
    if (channels != 1 && channels != 3 && channels != 4) {
        PyErr_SetString(PyExc_ValueError, "channels must be 1, 3 or 4");
        return NULL;
    }
    if (h < 0 || w < 0) {
        PyErr_SetString(PyExc_ValueError, "negative image size");
        return NULL;
    }
    Py_buffer raw, out;
    if (get_buffer(raw_obj, &raw, 0, "raw") != 0) return NULL;
    if (get_buffer(out_obj, &out, 1, "out") != 0) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    Py_ssize_t rowbytes = w * channels;
    if (raw.len != h * (rowbytes + 1) || out.len != h * w * 4) {
        PyBuffer_Release(&raw);
        PyBuffer_Release(&out);
        PyErr_Format(PyExc_ValueError, "unfilter_ids: %zd raw bytes for %zd x %zd x %d (%zd expected), out %zd bytes",
                     raw.len, h, w, channels, h * (rowbytes + 1), out.len);
        return NULL;
    }
    void *scratch = calloc((size_t)(2 * w + 1), sizeof(uint32_t)); /* two rows (zeros: the row above the first) */
    if (scratch == NULL) {
        PyBuffer_Release(&raw);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    Py_ssize_t bad_row;
    int bad_filter = 0;
    Py_BEGIN_ALLOW_THREADS
    bad_row = unfilter_image((const uint8_t *)raw.buf, h, w, channels, (uint32_t *)out.buf, scratch, &bad_filter);
    Py_END_ALLOW_THREADS
    free(scratch);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&out);
    if (bad_row >= 0) {
        PyErr_Format(PyExc_ValueError, "row %zd has the unknown PNG filter type %d", bad_row, bad_filter);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- Boundary PQ band */

#define EDGE_BLOCKS(T)                                                                          \
    for (Py_ssize_t y = 0; y + 1 < h; y++) {                                                    \
        const T *r0 = (const T *)ids + y * w, *r1 = r0 + w;                                     \
        uint8_t *o = edge + y * w;                                                              \
        for (Py_ssize_t x = 0; x + 1 < w; x++) {                                                \
            T a = r0[x];                                                                        \
            o[x] = (uint8_t)((a != r0[x + 1]) | (a != r1[x]) | (a != r1[x + 1]));                \
        }                                                                                       \
    }

/* edge (H, W) uint8, 1 at the top-left pixel of every 2x2 block holding more than one id */
static void edge_blocks(const void *ids, int itemsize, Py_ssize_t h, Py_ssize_t w, uint8_t *edge) {
    memset(edge, 0, (size_t)(h * w));
    if (itemsize == 4) {
        EDGE_BLOCKS(uint32_t)
    } else {
        EDGE_BLOCKS(uint64_t)
    }
}

/* out[x] = 1 when any src[t] is set for t in [x - d, x + d - 1] (a 2d window anchored at d), from the
   running count of set values in the window; stride steps between the values of one line */
static void window_any(const uint8_t *src, uint8_t *out, Py_ssize_t n, Py_ssize_t d) {
    Py_ssize_t count = 0, x;
    for (x = 0; x < d - 1 && x < n; x++) count += src[x];  /* window of x = 0 is [-d, d-1] */
    for (x = 0; x < n; x++) {
        if (x + d - 1 < n) count += src[x + d - 1];
        if (x - d - 1 >= 0) count -= src[x - d - 1];
        out[x] = count > 0;
    }
}

static PyObject *boundary_band(PyObject *self, PyObject *args) {
    PyObject *ids_obj, *out_obj;
    Py_ssize_t h, w, d;
    if (!PyArg_ParseTuple(args, "OnnnO", &ids_obj, &h, &w, &d, &out_obj)) return NULL;
    Py_buffer ids, out;
    if (get_buffer(ids_obj, &ids, 0, "ids") != 0) return NULL;
    if (get_buffer(out_obj, &out, 1, "out") != 0) {
        PyBuffer_Release(&ids);
        return NULL;
    }
    int itemsize = (int)ids.itemsize;
    if (h < 0 || w < 0 || d < 1 || (itemsize != 4 && itemsize != 8) || ids.len != h * w * itemsize ||
        out.len != h * w) {
        PyBuffer_Release(&ids);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "boundary_band: needs 4- or 8-byte (H, W) ids, d >= 1, (H, W) uint8 out");
        return NULL;
    }
    uint8_t *edge = (uint8_t *)malloc((size_t)(h * w) + 1);
    uint8_t *line = (uint8_t *)malloc((size_t)w + 1);
    int32_t *cols = (int32_t *)calloc((size_t)w + 1, sizeof(int32_t));
    if (edge == NULL || line == NULL || cols == NULL) {
        free(edge);
        free(line);
        free(cols);
        PyBuffer_Release(&ids);
        PyBuffer_Release(&out);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    uint8_t *band = (uint8_t *)out.buf;
    edge_blocks(ids.buf, itemsize, h, w, edge);
    /* rows: horizontal window, in place (edge row -> its own dilated row) */
    for (Py_ssize_t y = 0; y < h; y++) {
        window_any(edge + y * w, line, w, d);
        memcpy(edge + y * w, line, (size_t)w);
    }
    /* columns: running per-column count over rows [y - d, y + d - 1] */
    for (Py_ssize_t y = 0; y < d - 1 && y < h; y++)
        for (Py_ssize_t x = 0; x < w; x++) cols[x] += edge[y * w + x];
    for (Py_ssize_t y = 0; y < h; y++) {
        if (y + d - 1 < h) {
            const uint8_t *in = edge + (y + d - 1) * w;
            for (Py_ssize_t x = 0; x < w; x++) cols[x] += in[x];
        }
        if (y - d - 1 >= 0) {
            const uint8_t *gone = edge + (y - d - 1) * w;
            for (Py_ssize_t x = 0; x < w; x++) cols[x] -= gone[x];
        }
        uint8_t *o = band + y * w;
        int frame_row = y < d || y >= h - d;
        for (Py_ssize_t x = 0; x < w; x++) o[x] = (uint8_t)(frame_row | (cols[x] > 0));
        for (Py_ssize_t x = 0; x < d && x < w; x++) o[x] = 1;
        for (Py_ssize_t x = w - d > 0 ? w - d : 0; x < w; x++) o[x] = 1;
    }
    Py_END_ALLOW_THREADS
    free(edge);
    free(line);
    free(cols);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&out);
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

/* runs of equal (gt, pred[, code]); one table look-up per run */
#define COUNT_RUNS(T)                                                                           \
    {                                                                                           \
        const T *G = (const T *)gt_buf, *P = (const T *)pred_buf;                               \
        Py_ssize_t i = 0;                                                                       \
        while (i < n) {                                                                         \
            T g = G[i], p = P[i];                                                               \
            int c = gb ? (gb[i] | (pb[i] << 1)) : 0;                                            \
            Py_ssize_t j = i + 1;                                                               \
            if (gb) {                                                                           \
                while (j < n && G[j] == g && P[j] == p && (gb[j] | (pb[j] << 1)) == c) j++;     \
            } else {                                                                            \
                while (j < n && G[j] == g && P[j] == p) j++;                                    \
            }                                                                                   \
            if (g != last_g || p != last_p || last < 0) {                                        \
                last = table_entry(&t, (uint64_t)g, (uint64_t)p);                               \
                if (last < 0) { oom = 1; break; }                                               \
                last_g = g;                                                                     \
                last_p = p;                                                                     \
            }                                                                                   \
            t.counts[last * n_codes + c] += j - i;                                              \
            i = j;                                                                              \
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
    if (itemsize == 4) {
        uint32_t last_g = 0, last_p = 0;
        COUNT_RUNS(uint32_t)
    } else {
        uint64_t last_g = 0, last_p = 0;
        COUNT_RUNS(uint64_t)
    }
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
     "unfilter_ids(raw, height, width, channels, out): PNG unfilter + RGB -> uint32 id (GIL released)."},
    {"boundary_band", boundary_band, METH_VARARGS,
     "boundary_band(ids, height, width, d, out): Boundary PQ band of an id map into uint8 out."},
    {"count_pairs", count_pairs, METH_VARARGS,
     "count_pairs(gt, pred[, gt_band, pred_band]) -> (gt ids, pred ids, counts) as bytes of uint64/int64."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pq_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pq_native(void) { return PyModule_Create(&module); }
