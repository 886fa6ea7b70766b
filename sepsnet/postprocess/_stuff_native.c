/* sepsnet.postprocess._stuff_native: the decided stuff labels of stuff.py in one C pass (optional; the
 * NumPy form in stuff.py gives the same labels, slower). Plain CPython API and the buffer protocol (no
 * numpy headers); the work runs with the GIL released, on the calling thread.
 *
 *   decide_labels(logits, ty0, ty1, tly, tx0, tx1, tlx, margin, out, near) -> n
 *
 * logits: (C, h, w) float32, any strides (the cropped, unpadded stuff logits). ty0/ty1 (int64) and tly
 * (float32) per output row, tx0/tx1/tlx per output column: the source cells and second weight of the
 * dense F.interpolate of the map padded by one replicated cell (stuff.source_taps), so an index h (w)
 * is that replica and reads cell h - 1 (w - 1) here. out: (oh, ow) uint8 or int64, C-contiguous. near:
 * int64 (cap, 2), C-contiguous. The label of each pixel is written into out; returns the number n of
 * near ties, whose (y, x) are near[:n] and whose labels the caller must decide with the kernel itself;
 * -1 when a logit is NaN or infinite, -2 when there are more than cap near ties (then out is
 * incomplete and the caller runs the dense path).
 *
 * With bound = max |logit| and m = margin x bound, per output pixel (stuff.py, _decided_labels, has
 * the argument: the kernel's values are within a few float32 ulps of bound of the exact weighted sums
 * of the 4 source cells, and so are the sums here, far inside m). A class's "lead" at a cell (or any
 * weighted sum of cells) is its value minus the largest other value: the gap to the runner-up where
 * it is the top class, else its value minus the top value (<= 0). A weighted sum of leads bounds the
 * lead of the weighted sum from below (the minimum of a sum is at least the sum of the minima).
 *   1. its 4 source cells share their top class k, each ahead of its runner-up by more than m: k
 *      (decided once per source row for all its output rows: a template row, copied);
 *   2. else, for each distinct top class A of the 4 cells (leads per cell set up once per source row
 *      and run of output columns): the bilinear sum of A's 4 cell leads exceeds m: A;
 *   3. else its two source columns are mixed between its two source rows (once per output row and
 *      column, float32). With A and B the top classes of the two mixed columns: the convex sum
 *      (weights 1 - lx, lx) of A's, then B's, two column leads exceeds m: that class;
 *   4. else every class interpolated along the row: the first maximum when it leads the runner-up
 *      by more than m;
 *   5. else a near tie, left to the caller.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *base; /* cell (k, i, j) at base[k * sc + i * sh + j * sw] */
    Py_ssize_t c, h, w, sc, sh, sw;
} Logits;

static inline float logit(const Logits *L, Py_ssize_t k, Py_ssize_t i, Py_ssize_t j) {
    return L->base[k * L->sc + i * L->sh + j * L->sw];
}

/* the running first maximum (index T, value B) and runner-up S after value V of class K (bj, sj: B and
   S before): strictly greater moves the maximum, so the first one stays; the runner-up becomes
   max(S, min(V, B)), so a tie gives B (lead 0). The int select as a mask: GCC vectorises it so. */
#define TOP_UPDATE(T, B, S, V, bj, sj, K)                                                                       \
    {                                                                                                           \
        int32_t gt_ = -(int32_t)((V) > (bj)), tj_ = (T);                                                        \
        float under_ = (V) < (bj) ? (V) : (bj);                                                                 \
        (S) = under_ > (sj) ? under_ : (sj);                                                                    \
        (T) = ((K) & gt_) | (tj_ & ~gt_);                                                                       \
        (B) = (V) > (bj) ? (V) : (bj);                                                                          \
    }

/* one row of cells (column stride SW): per column the top class, its lead and value, running minimum
   in lo, maximum |value| into hi, non-finite values into bad. Classes outer, columns inner: the planes
   are read in order and the per-column updates vectorise (the row's state stays in L1). */
#define CELL_ROW(SW)                                                                                            \
    {                                                                                                           \
        const float *p = row;                                                                                   \
        for (Py_ssize_t j = 0; j < w; j++) {                                                                    \
            float v = p[j * (SW)];                                                                              \
            bad |= !(v - v == 0.0f);                                                                            \
            b[j] = lo[j] = v;                                                                                   \
            s[j] = -INFINITY;                                                                                   \
            t[j] = 0;                                                                                           \
        }                                                                                                       \
        for (Py_ssize_t k = 1; k < c; k++) {                                                                    \
            p = row + k * sc;                                                                                   \
            for (Py_ssize_t j = 0; j < w; j++) {                                                                \
                float v = p[j * (SW)], bj = b[j], sj = s[j], lj = lo[j];                                        \
                bad |= !(v - v == 0.0f);                                                                        \
                TOP_UPDATE(t[j], b[j], s[j], v, bj, sj, (int32_t)k)                                             \
                lo[j] = v < lj ? v : lj;                                                                        \
            }                                                                                                   \
        }                                                                                                       \
        for (Py_ssize_t j = 0; j < w; j++) {                                                                    \
            s[j] = b[j] - s[j];                                                                                 \
            float a = b[j] > -lo[j] ? b[j] : -lo[j];                                                            \
            hi = a > hi ? a : hi;                                                                               \
        }                                                                                                       \
    }

/* per cell: top class (first maximum), lead over the runner-up (0 at a tie), best value; bound = max
   |logit|; low: w floats of scratch. Returns 0, or -1 when a logit is not finite. */
static int cell_pass(const Logits *L, int32_t *top, float *lead, float *best, float *low, double *bound) {
    const Py_ssize_t c = L->c, h = L->h, w = L->w, sc = L->sc, sw = L->sw;
    int bad = 0;
    float hi = 0.0f;
    for (Py_ssize_t i = 0; i < h; i++) {
        const float *row = L->base + i * L->sh;
        int32_t *restrict t = top + i * w;
        float *restrict b = best + i * w, *restrict s = lead + i * w, *restrict lo = low;
        if (sw == 1)
            CELL_ROW(1)
        else
            CELL_ROW(sw)
    }
    *bound = hi;
    return bad ? -1 : 0;
}

/* ok[i * w + j] = 1 when cells (i..i+1, j..j+1) (clamped at the last row / column) share their top
   class, each with a lead above the margin m (a float not below it) */
static void block_pass(const int32_t *top, const float *lead, Py_ssize_t h, Py_ssize_t w, double margin,
                       uint8_t *ok) {
    float m = (float)margin;
    if ((double)m < margin) m = nextafterf(m, INFINITY);
    for (Py_ssize_t i = 0; i < h; i++) {
        Py_ssize_t i1 = i + 1 < h ? i + 1 : i;
        for (Py_ssize_t j = 0; j < w; j++) {
            Py_ssize_t j1 = j + 1 < w ? j + 1 : j;
            Py_ssize_t a = i * w + j, b = i * w + j1, d = i1 * w + j, e = i1 * w + j1;
            int32_t k = top[a];
            ok[a] = (uint8_t)(lead[a] > m && lead[b] > m && lead[d] > m && lead[e] > m && top[b] == k &&
                              top[d] == k && top[e] == k);
        }
    }
}

/* the source columns mixed between the current output row's two source rows (step 3), computed when
   first needed in the row: per column j (valid where stamp[j] == the row) its C values, top class,
   value and lead */
typedef struct {
    const Logits *L;
    float *mix; /* (w, C) */
    int32_t *top;
    float *best, *lead;
    Py_ssize_t *stamp;
    Py_ssize_t y, i0, i1;
    float ly;
} RowMix;

static inline void row_mix(RowMix *R, Py_ssize_t j) {
    if (R->stamp[j] == R->y) return;
    const Logits *L = R->L;
    const float *p0 = L->base + R->i0 * L->sh + j * L->sw, *p1 = L->base + R->i1 * L->sh + j * L->sw;
    float *r = R->mix + j * L->c;
    const float wy0 = 1.0f - R->ly, wy1 = R->ly;
    float best = r[0] = wy0 * p0[0] + wy1 * p1[0], second = -INFINITY;
    int32_t top = 0;
    for (Py_ssize_t k = 1; k < L->c; k++) {
        float v = r[k] = wy0 * p0[k * L->sc] + wy1 * p1[k * L->sc];
        if (v > best) { /* strictly greater: the first maximum stays */
            second = best;
            best = v;
            top = (int32_t)k;
        } else if (v > second) {
            second = v;
        }
    }
    R->top[j] = top;
    R->best[j] = best;
    R->lead[j] = best - second;
    R->stamp[j] = R->y;
}

/* class a's lead in mixed column j (exact where a is its top, else a bound from below) */
static inline double mix_lead(const RowMix *R, Py_ssize_t j, int32_t a) {
    return R->top[j] == a ? (double)R->lead[j] : (double)R->mix[j * R->L->c + a] - (double)R->best[j];
}

/* class a's lead at a cell (exact where a is its top, else a bound from below) */
static inline double cell_lead(const Logits *L, const int32_t *top, const float *lead, const float *best,
                               Py_ssize_t i, Py_ssize_t j, int32_t a) {
    Py_ssize_t k = i * L->w + j;
    return top[k] == a ? (double)lead[k] : (double)logit(L, a, i, j) - (double)best[k];
}

/* a run of output columns sharing their source columns j0, j1; when open (step 1 fails for the current
   source row) its step-2 candidates: up to 4 classes with their leads at cells (i0, j0), (i0, j1),
   (i1, j0), (i1, j1) */
typedef struct {
    Py_ssize_t x0, x1, j0, j1;
    double lx_lo, lx_hi; /* the range of the column weights */
    int n;
    int32_t cls[4];
    double m[4][4];
} Run;

typedef struct {
    const int64_t *ty0, *ty1, *tx0, *tx1;
    const float *tly, *tlx;
    Py_ssize_t oh, ow;
    void *out;
    int itemsize;
    int64_t *near;
    Py_ssize_t cap;
} Job;

static inline void put_label(void *row, int itemsize, Py_ssize_t x, int64_t label) {
    if (itemsize == 1)
        ((uint8_t *)row)[x] = (uint8_t)label;
    else
        ((int64_t *)row)[x] = label;
}

/* steps 2-5 for the pixels of an open run in output row y: labels into row; returns the near-tie
   count, or -1 past cap */
static Py_ssize_t open_run(RowMix *R, const Run *u, const Job *J, double margin, void *row, Py_ssize_t n_near) {
    const double ly = R->ly, ly0 = 1.0 - ly;
    const Py_ssize_t c = R->L->c;
    /* step 2 per candidate: its cell leads mixed between the rows, then a0 (1 - lx) + a1 lx per pixel;
       an absent candidate never passes (at least one of the two weights is >= 1/2) */
    double a0[4], a1[4];
    int64_t cls[4];
    for (int q = 0; q < 4; q++) {
        a0[q] = q < u->n ? ly0 * u->m[q][0] + ly * u->m[q][2] : -1e300;
        a1[q] = q < u->n ? ly0 * u->m[q][1] + ly * u->m[q][3] : -1e300;
        cls[q] = q < u->n ? u->cls[q] : -1;
    }
    /* locals: the byte stores into row may alias any memory, so fields read through pointers would be
       reloaded after each */
    const float *tlx = J->tlx;
    const int itemsize = J->itemsize;
    const Py_ssize_t x1 = u->x1;
    for (Py_ssize_t x = u->x0; x < x1; x++) {
        const double lx = tlx[x], lx0 = 1.0 - lx;
        /* at most one class can have a positive lower bound of lead, so the order does not matter:
           selects, no branches (the winner changes from pixel to pixel where the cells disagree) */
        int64_t label = a0[3] * lx0 + a1[3] * lx > margin ? cls[3] : -1;
        label = a0[2] * lx0 + a1[2] * lx > margin ? cls[2] : label;
        label = a0[1] * lx0 + a1[1] * lx > margin ? cls[1] : label;
        label = a0[0] * lx0 + a1[0] * lx > margin ? cls[0] : label;
        if (label < 0) { /* step 3 */
            row_mix(R, u->j0);
            row_mix(R, u->j1);
            int32_t a = R->top[u->j0], b = R->top[u->j1];
            if (lx0 * mix_lead(R, u->j0, a) + lx * mix_lead(R, u->j1, a) > margin)
                label = a;
            else if (b != a && lx0 * mix_lead(R, u->j0, b) + lx * mix_lead(R, u->j1, b) > margin)
                label = b;
        }
        if (label < 0) { /* step 4 */
            const float *r0 = R->mix + u->j0 * c, *r1 = R->mix + u->j1 * c;
            const float fx1 = tlx[x], fx0 = 1.0f - fx1;
            float best = fx0 * r0[0] + fx1 * r1[0], second = -INFINITY;
            label = 0;
            for (Py_ssize_t k = 1; k < c; k++) {
                float v = fx0 * r0[k] + fx1 * r1[k];
                if (v > best) {
                    second = best;
                    best = v;
                    label = k;
                } else if (v > second) {
                    second = v;
                }
            }
            if (!((double)best - (double)second > margin)) { /* step 5 */
                if (n_near == J->cap) return -1;
                J->near[2 * n_near] = R->y;
                J->near[2 * n_near + 1] = x;
                n_near++;
            }
        }
        put_label(row, itemsize, x, label);
    }
    return n_near;
}

/* the whole decision; returns the near-tie count, -1 (non-finite logit), -2 (over cap) or -3 (memory) */
static Py_ssize_t decide(const Logits *L, const Job *J, double margin_factor) {
    const Py_ssize_t h = L->h, w = L->w, c = L->c, cells = h * w, oh = J->oh, ow = J->ow;
    const size_t row_bytes = (size_t)ow * (size_t)J->itemsize;
    int32_t *top = (int32_t *)malloc((size_t)cells * sizeof(int32_t));
    float *lead = (float *)malloc((size_t)cells * sizeof(float));
    float *best = (float *)malloc((size_t)cells * sizeof(float));
    float *low = (float *)malloc((size_t)w * sizeof(float));
    uint8_t *ok = (uint8_t *)malloc((size_t)cells);
    float *mix = (float *)malloc((size_t)(w * c) * sizeof(float));
    int32_t *mix_top = (int32_t *)malloc((size_t)w * sizeof(int32_t));
    float *mix_best = (float *)malloc((size_t)w * sizeof(float));
    float *mix_lead = (float *)malloc((size_t)w * sizeof(float));
    Py_ssize_t *stamp = (Py_ssize_t *)malloc((size_t)w * sizeof(Py_ssize_t));
    Run *runs = (Run *)malloc((size_t)(ow > 0 ? ow : 1) * sizeof(Run));
    Py_ssize_t *open = (Py_ssize_t *)malloc((size_t)(ow > 0 ? ow : 1) * sizeof(Py_ssize_t));
    void *tmpl = malloc(row_bytes > 0 ? row_bytes : 1);
    Py_ssize_t n_near = -3;
    if (!top || !lead || !best || !low || !ok || !mix || !mix_top || !mix_best || !mix_lead || !stamp || !runs || !open ||
        !tmpl)
        goto done;
    double bound;
    int bad_cells = cell_pass(L, top, lead, best, low, &bound);
    if (bad_cells != 0) {
        n_near = -1;
        goto done;
    }
    const double margin = margin_factor * bound;
    block_pass(top, lead, h, w, margin, ok);
    for (Py_ssize_t j = 0; j < w; j++) stamp[j] = -1;
    RowMix R = {L, mix, mix_top, mix_best, mix_lead, stamp, -1, 0, 0, 0.0f};
    /* runs of output columns with the same two source columns (the same for every row) */
    Py_ssize_t n_runs = 0;
    for (Py_ssize_t x = 0; x < ow; x++) {
        Py_ssize_t j0 = J->tx0[x] < w ? J->tx0[x] : w - 1, j1 = J->tx1[x] < w ? J->tx1[x] : w - 1;
        if (n_runs == 0 || runs[n_runs - 1].j0 != j0 || runs[n_runs - 1].j1 != j1) {
            runs[n_runs] = (Run){x, x + 1, j0, j1, J->tlx[x], J->tlx[x], 0, {0}, {{0}}};
            n_runs++;
        } else {
            Run *u = &runs[n_runs - 1];
            u->x1 = x + 1;
            u->lx_lo = J->tlx[x] < u->lx_lo ? J->tlx[x] : u->lx_lo;
            u->lx_hi = J->tlx[x] > u->lx_hi ? J->tlx[x] : u->lx_hi;
        }
    }
    n_near = 0;
    Py_ssize_t last_i0 = -1, last_i1 = -1, n_open = 0;
    for (Py_ssize_t y = 0; y < oh; y++) {
        const Py_ssize_t i0 = J->ty0[y] < h ? J->ty0[y] : h - 1, i1 = J->ty1[y] < h ? J->ty1[y] : h - 1;
        if (i0 != last_i0 || i1 != last_i1) { /* step 1 for every output row of these source rows: the
                                                 template row, and the step-2 candidates of the runs left open */
            last_i0 = i0;
            last_i1 = i1;
            const uint8_t *ok_row = ok + i0 * w;
            const int32_t *top_row = top + i0 * w;
            /* the row weights of the output rows that follow with these source rows (those that use
               this template) */
            double ly_lo = J->tly[y], ly_hi = J->tly[y];
            for (Py_ssize_t z = y + 1; z < oh && (J->ty0[z] < h ? J->ty0[z] : h - 1) == i0 &&
                                       (J->ty1[z] < h ? J->ty1[z] : h - 1) == i1; z++) {
                ly_lo = J->tly[z] < ly_lo ? J->tly[z] : ly_lo;
                ly_hi = J->tly[z] > ly_hi ? J->tly[z] : ly_hi;
            }
            n_open = 0;
            for (Py_ssize_t r = 0; r < n_runs; r++) {
                Run *u = &runs[r];
                int64_t label = -1;
                if (ok_row[u->j0]) {
                    label = top_row[u->j0];
                } else {
                    const Py_ssize_t ci[4] = {i0, i0, i1, i1}, cj[4] = {u->j0, u->j1, u->j0, u->j1};
                    u->n = 0;
                    for (int q = 0; q < 4; q++) {
                        int32_t a = top[ci[q] * w + cj[q]];
                        int seen = 0;
                        for (int p = 0; p < u->n; p++) seen |= u->cls[p] == a;
                        if (seen) continue;
                        u->cls[u->n] = a;
                        for (int p = 0; p < 4; p++) u->m[u->n][p] = cell_lead(L, top, lead, best, ci[p], cj[p], a);
                        u->n++;
                    }
                    /* step 2 for the whole run at once: the bilinear bound is smallest at a corner of the
                       rectangle of the run's (ly, lx) weights */
                    const double lx_lo = u->lx_lo, lx_hi = u->lx_hi;
                    for (int q = 0; q < u->n && label < 0; q++) {
                        const double *m = u->m[q];
                        double low = INFINITY;
                        for (int corner = 0; corner < 4; corner++) {
                            double ly = corner & 1 ? ly_hi : ly_lo, lx = corner & 2 ? lx_hi : lx_lo;
                            double f = (1.0 - ly) * ((1.0 - lx) * m[0] + lx * m[1]) + ly * ((1.0 - lx) * m[2] + lx * m[3]);
                            low = f < low ? f : low;
                        }
                        if (low > margin) label = u->cls[q];
                    }
                }
                if (label < 0) {
                    open[n_open++] = r;
                } else if (J->itemsize == 1) {
                    memset((uint8_t *)tmpl + u->x0, (int)label, (size_t)(u->x1 - u->x0));
                } else {
                    for (Py_ssize_t x = u->x0; x < u->x1; x++) ((int64_t *)tmpl)[x] = label;
                }
            }
        }
        void *row = (uint8_t *)J->out + (size_t)y * row_bytes;
        memcpy(row, tmpl, row_bytes);
        R.y = y;
        R.i0 = i0;
        R.i1 = i1;
        R.ly = J->tly[y];
        for (Py_ssize_t q = 0; q < n_open; q++) {
            n_near = open_run(&R, &runs[open[q]], J, margin, row, n_near);
            if (n_near < 0) {
                n_near = -2;
                goto done;
            }
        }
    }
done:
    free(top);
    free(lead);
    free(best);
    free(low);
    free(ok);
    free(mix);
    free(mix_top);
    free(mix_best);
    free(mix_lead);
    free(stamp);
    free(runs);
    free(open);
    free(tmpl);
    return n_near;
}

static int get_contiguous(PyObject *obj, Py_buffer *view, int writable, const char *what, Py_ssize_t itemsize,
                          const char *format) {
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer", what, writable ? " writable" : "");
        return -1;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;
    if (view->itemsize != itemsize || strchr(format, *f) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must hold %zd-byte items of type '%s', got '%s'", what, itemsize, format,
                     view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int taps_in_range(const int64_t *t, Py_ssize_t n, Py_ssize_t cells) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (t[i] < 0 || t[i] > cells) return 0; /* index `cells` is the replicated extra cell */
    return 1;
}

static PyObject *decide_labels(PyObject *self, PyObject *args) {
    PyObject *obj[10];
    double margin;
    if (!PyArg_ParseTuple(args, "OOOOOOOdOO", &obj[0], &obj[1], &obj[2], &obj[3], &obj[4], &obj[5], &obj[6],
                          &margin, &obj[7], &obj[8]))
        return NULL;
    Py_buffer v[9];
    int held = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(obj[0], &v[0], PyBUF_STRIDES | PyBUF_FORMAT) != 0) {
        PyErr_SetString(PyExc_TypeError, "logits must be a (C, h, w) float32 buffer");
        return NULL;
    }
    held = 1;
    const char *fmt = v[0].format ? v[0].format : "B";
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') fmt++;
    if (v[0].ndim != 3 || v[0].itemsize != 4 || *fmt != 'f') {
        PyErr_SetString(PyExc_TypeError, "logits must be a (C, h, w) float32 buffer");
        goto release;
    }
    static const char *names[9] = {"logits", "ty0", "ty1", "tly", "tx0", "tx1", "tlx", "out", "near"};
    for (int b = 1; b < 9; b++) {
        int is_float = b == 3 || b == 6, writable = b >= 7;
        Py_ssize_t itemsize = is_float ? 4 : 8;
        const char *format = is_float ? "f" : "qlL";
        if (b == 7) { /* out: uint8 or int64 labels, checked below */
            if (PyObject_GetBuffer(obj[b], &v[b], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) {
                PyErr_SetString(PyExc_TypeError, "out must be a writable C-contiguous buffer");
                goto release;
            }
        } else if (get_contiguous(obj[b], &v[b], writable, names[b], itemsize, format) != 0) {
            goto release;
        }
        held = b + 1;
    }
    Py_ssize_t c = v[0].shape[0], h = v[0].shape[1], w = v[0].shape[2];
    Py_ssize_t oh = v[1].len / 8, ow = v[4].len / 8, out_item = v[7].itemsize;
    int strided = v[0].strides[0] % 4 == 0 && v[0].strides[1] % 4 == 0 && v[0].strides[2] % 4 == 0 &&
                  v[0].strides[0] >= 0 && v[0].strides[1] >= 0 && v[0].strides[2] >= 0;
    if (c < 2 || h < 1 || w < 1 || !strided) {
        PyErr_SetString(PyExc_ValueError, "decide_labels: logits need >= 2 classes, >= 1 cell and non-negative "
                                          "float-aligned strides");
        goto release;
    }
    if (v[2].len != oh * 8 || v[3].len != oh * 4 || v[5].len != ow * 8 || v[6].len != ow * 4) {
        PyErr_SetString(PyExc_ValueError, "decide_labels: ty0/ty1/tly and tx0/tx1/tlx need one length each");
        goto release;
    }
    if ((out_item != 1 && out_item != 8) || v[7].len != oh * ow * out_item || (out_item == 1 && c > 256)) {
        PyErr_Format(PyExc_ValueError, "decide_labels: out must be (%zd, %zd) uint8 (<= 256 classes) or int64", oh,
                     ow);
        goto release;
    }
    if (v[8].len % 16 != 0) {
        PyErr_SetString(PyExc_ValueError, "decide_labels: near must be (cap, 2) int64");
        goto release;
    }
    const int64_t *ty0 = (const int64_t *)v[1].buf, *ty1 = (const int64_t *)v[2].buf;
    const int64_t *tx0 = (const int64_t *)v[4].buf, *tx1 = (const int64_t *)v[5].buf;
    if (!taps_in_range(ty0, oh, h) || !taps_in_range(ty1, oh, h) || !taps_in_range(tx0, ow, w) ||
        !taps_in_range(tx1, ow, w)) {
        PyErr_SetString(PyExc_ValueError, "decide_labels: a source index is outside the (padded) map");
        goto release;
    }
    Logits L = {(const float *)v[0].buf, c, h, w, v[0].strides[0] / 4, v[0].strides[1] / 4, v[0].strides[2] / 4};
    Job J = {ty0, ty1, tx0, tx1, (const float *)v[3].buf, (const float *)v[6].buf, oh, ow, v[7].buf,
             (int)out_item, (int64_t *)v[8].buf, v[8].len / 16};
    Py_ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    n = decide(&L, &J, margin);
    Py_END_ALLOW_THREADS
    if (n == -3)
        PyErr_NoMemory();
    else
        result = PyLong_FromSsize_t(n);
release:
    for (int b = 0; b < held; b++) PyBuffer_Release(&v[b]);
    return result;
}

static PyMethodDef methods[] = {
    {"decide_labels", decide_labels, METH_VARARGS,
     "decide_labels(logits, ty0, ty1, tly, tx0, tx1, tlx, margin, out, near) -> number of near ties (their "
     "(y, x) in near), -1 for a non-finite logit, -2 for more near ties than near holds (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_stuff_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__stuff_native(void) { return PyModule_Create(&module); }
