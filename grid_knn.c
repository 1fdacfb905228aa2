/* Exact k-NN on an axis-aligned grid, without enumerating it (action_space.GridActionSpace._grid_search).

   The squared distance from a proto-action to a grid point is a sum of per-axis terms. On each axis the
   coordinates are ranked by their distance to the proto (rank 0 the nearest); a point's "excess" is the sum,
   over its axes, of how much farther its coordinate is than that axis's nearest, so the k nearest points are
   the k of smallest excess. Per query:
     1. a bound U with at least k points of excess <= U: first from whole axes (their product of coordinates
        reaches k), then tightened twice by counting points over a histogram of quantised excesses;
     2. every point of excess <= U, each listed once: a point is the nearest point plus changes on some axes,
        added in the order of the axes' cheapest change, so a point's children only change later axes;
     3. the k of smallest excess among them (a histogram of their excesses finds the bin of the k-th, a
        quickselect the k-th within it; ties at the k-th broken arbitrarily), written in listing order as
        coordinates or as weighted sums of groups of coordinates (a point's row in each group's table).
   The work grows with k (about 1.1 k points listed per query), not with the number of grid points. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BINS 256
#define SELECT_BINS 4096  /* of the histogram that finds the k-th smallest excess among the listed points */

typedef struct { double excess; int32_t position; } Node;  /* position: the last changed axis, in `order` */
typedef struct { double key; int32_t id; } Keyed;

static int by_key(const void *a, const void *b) {
  double x = ((const Keyed *)a)->key, y = ((const Keyed *)b)->key;
  return (x > y) - (x < y);
}

/* The `width` coordinates of an axis of `count` points, nearest to position `pos` (in steps) first, and
   their excess over the nearest one. */
static void rank_axis(double pos, int64_t count, double step, double proto, int64_t width, int64_t *coord,
                      double *excess) {
  int64_t left = (int64_t)pos, right = left + 1;
  if (pos < 0) left = -1, right = 0;
  if (left >= count - 1) left = count - 1, right = count;
  for (int64_t r = 0; r < width; r++) {
    double to_left = left >= 0 ? left * step - 1.0 - proto : 0;
    double to_right = right < count ? right * step - 1.0 - proto : 0;
    int take_left = right >= count || (left >= 0 && to_left * to_left <= to_right * to_right);
    coord[r] = take_left ? left-- : right++;
    excess[r] = take_left ? to_left * to_left : to_right * to_right;
  }
  for (int64_t r = width - 1; r >= 0; r--) excess[r] -= excess[0];
}

/* A tighter bound than `bound` (>= k points of excess <= it): count points whose excess, quantised down
   to BINS steps of bound / BINS, is at most t; the smallest t that reaches k bounds the true excess by
   (t + changed axes) steps. */
static double tighten(double bound, int64_t k, int n_axes, const int32_t *order, const int64_t *width,
                      double *const *excess, double *count, double *next) {
  double step = bound / BINS;
  if (!(step > 0)) return bound;
  memset(count, 0, sizeof(double) * (BINS + 1));
  count[0] = 1;
  double histogram[BINS + 1];
  for (int j = 0; j < n_axes; j++) {
    const double *e = excess[order[j]];
    if (e[1] > bound) break;  /* this axis and every later one can only stay at rank 0 */
    memset(histogram, 0, sizeof histogram);
    for (int64_t r = 0; r < width[order[j]] && e[r] <= bound; r++) {
      int64_t q = (int64_t)(e[r] / step);
      histogram[q > BINS ? BINS : q] += 1;
    }
    memset(next, 0, sizeof(double) * (BINS + 1));
    for (int q = 0; q <= BINS; q++)
      if (histogram[q] > 0)
        for (int t = q; t <= BINS; t++) next[t] += histogram[q] * count[t - q];
    memcpy(count, next, sizeof(double) * (BINS + 1));
  }
  double reached = 0;
  int t = 0;
  for (; t <= BINS; t++) if ((reached += count[t]) >= (double)k) break;
  if (t > BINS) return bound;
  int changed = 0;  /* the most axes a counted point can change: the cheapest first changes add up to <= t */
  int64_t cheapest = 0;
  for (int j = 0; j < n_axes && excess[order[j]][1] <= bound; j++) {
    cheapest += (int64_t)(excess[order[j]][1] / step);
    if (cheapest > t) break;
    changed++;
  }
  double tighter = (t + changed) * step * (1.0 + 1e-12);
  return tighter < bound ? tighter : bound;
}

/* Index i of a row of unsigned integers of `size` bytes (signed ones of 8). */
static int64_t load(const void *row, int i, int size) {
  switch (size) {
    case 1: return ((const uint8_t *)row)[i];
    case 2: return ((const uint16_t *)row)[i];
    case 4: return ((const uint32_t *)row)[i];
    default: return ((const int64_t *)row)[i];
  }
}

/* Stores v at index i of such a row. */
static void store(void *row, int i, int size, int64_t v) {
  switch (size) {
    case 1: ((uint8_t *)row)[i] = (uint8_t)v; break;
    case 2: ((uint16_t *)row)[i] = (uint16_t)v; break;
    case 4: ((uint32_t *)row)[i] = (uint32_t)v; break;
    default: ((int64_t *)row)[i] = v;
  }
}

/* Copies a row of `size` bytes; rows of up to 8 bytes by copies of a fixed size, which compile to a few moves
   (measured: 6 to 15% off the whole search, against one memcpy of a size known only at run time). */
static void copy_row(char *to, const char *from, size_t size) {
  switch (size) {
    case 1: memcpy(to, from, 1); break;
    case 2: memcpy(to, from, 2); break;
    case 3: memcpy(to, from, 3); break;
    case 4: memcpy(to, from, 4); break;
    case 5: memcpy(to, from, 5); break;
    case 6: memcpy(to, from, 6); break;
    case 7: memcpy(to, from, 7); break;
    case 8: memcpy(to, from, 8); break;
    default: memcpy(to, from, size);
  }
}

/* How a point is written out: column j holds the sum of weight[i] * coordinate i over the axes i with
   column[i] == j, integers of `size` bytes, `columns` of them. */
typedef struct { int columns, size; const int32_t *column; const int64_t *weight; } Layout;

/* The listed points: their tree nodes and, beside each, its row as written out. */
typedef struct { Node *nodes; char *rows; int64_t capacity; } Listing;

/* Every point of excess <= bound, as a tree: node 0 the nearest point (row `nearest`), a child one more changed
   axis. A child's row is its parent's with one column changed, so a chosen point's row is read, not rebuilt. */
static int64_t list_points(double bound, int n_axes, const int32_t *order, const int64_t *width,
                           double *const *excess, int64_t *const *coord, Layout layout, const char *nearest,
                           Listing *listing) {
  int64_t n = 1, row_size = (int64_t)layout.columns * layout.size;
  listing->nodes[0] = (Node){0.0, -1};
  memcpy(listing->rows, nearest, row_size);
  for (int64_t i = 0; i < n; i++) {
    Node node = listing->nodes[i];
    double room = bound - node.excess;
    for (int j = node.position + 1; j < n_axes; j++) {
      const double *e = excess[order[j]];
      if (e[1] > room) break;  /* axes are in the order of their cheapest change */
      int a = order[j], col = layout.column[a];
      for (int64_t r = 1; r < width[a] && e[r] <= room; r++) {
        if (n == listing->capacity) {
          Node *nodes = realloc(listing->nodes, sizeof(Node) * listing->capacity * 2);
          if (nodes) listing->nodes = nodes;
          char *rows = realloc(listing->rows, row_size * listing->capacity * 2);
          if (rows) listing->rows = rows;
          if (!nodes || !rows) return -1;
          listing->capacity *= 2;
        }
        listing->nodes[n] = (Node){node.excess + e[r], j};
        char *row = listing->rows + n * row_size;
        copy_row(row, listing->rows + i * row_size, row_size);
        store(row, col, layout.size, load(row, col, layout.size) + layout.weight[a] * (coord[a][r] - coord[a][0]));
        n++;
      }
    }
  }
  return n;
}

/* Moves the k smallest of n values to the front (Hoare quickselect). */
static void select_smallest(double *a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    double pivot = a[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) { double t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
    }
    if (k - 1 <= j) hi = j;
    else if (k - 1 >= i) lo = i;
    else return;
  }
}

/* The bin of an excess in [0, bound], at `scale` = SELECT_BINS / bound (larger ones in the last bin). */
static int bin_of(double excess, double scale) {
  double bin = excess * scale;
  return bin < SELECT_BINS - 1 ? (int)bin : SELECT_BINS - 1;
}

/* Writes the rows of the k listed points of smallest excess (of n, all <= bound), in listing order, which reads
   the rows in sequence. The points of the bins below the k-th's are taken; of that bin's, the smallest, found by
   a quickselect among their excesses (`last` holds room for n). */
static void write_nearest(const Listing *listing, int64_t n, int64_t k, double bound, size_t row_size,
                          double *last, char *out) {
  int64_t histogram[SELECT_BINS] = {0}, below = 0, in_last = 0;
  double scale = bound > 0 ? SELECT_BINS / bound : 0;
  for (int64_t i = 0; i < n; i++) histogram[bin_of(listing->nodes[i].excess, scale)]++;
  int kth_bin = 0;
  while (below + histogram[kth_bin] < k) below += histogram[kth_bin++];
  for (int64_t i = 0; i < n; i++)
    if (bin_of(listing->nodes[i].excess, scale) == kth_bin) last[in_last++] = listing->nodes[i].excess;
  int64_t need = k - below, ties = 0;  /* from the k-th's bin: its `need` smallest */
  select_smallest(last, in_last, need);
  double kth = last[0];
  for (int64_t c = 1; c < need; c++) kth = last[c] > kth ? last[c] : kth;
  for (int64_t c = 0; c < need; c++) ties += last[c] == kth;  /* points of the k-th's excess to take */
  for (int64_t i = 0, c = 0; c < k; i++) {
    double e = listing->nodes[i].excess;
    int bin = bin_of(e, scale);
    if (bin < kth_bin || (bin == kth_bin && (e < kth || (e == kth && ties-- > 0))))
      copy_row(out + c++ * row_size, listing->rows + i * row_size, row_size);
  }
}

/* protos (queries, dim) in [-1, 1]; writes out (queries, k, columns), integers of `size` bytes (1, 2, 4:
   unsigned; 8: signed): column j of a point holds the sum of weight[i] * coordinate i over the axes i with
   column[i] == j (its coordinates: columns = dim, column[i] = i, weight[i] = 1). Returns 0; -1 when memory ran
   out; -2 when fewer than k points were listed, which the bound's construction rules out. */
int grid_knn(int64_t queries, int dim, const int64_t *counts, const double *steps, const double *protos, int64_t k,
             int columns, const int32_t *column, const int64_t *weight, int size, void *out) {
  int32_t *order = malloc(sizeof(int32_t) * dim), *axes = malloc(sizeof(int32_t) * dim);
  int64_t *width = calloc(dim, sizeof(int64_t)), total = 0, capacity = 2 * k + 16;
  Layout layout = {columns, size, column, weight};
  double **excess = calloc(dim, sizeof(double *)), count[BINS + 1], next[BINS + 1];
  int64_t **coord = calloc(dim, sizeof(int64_t *));
  Keyed *cheapest = malloc(sizeof(Keyed) * dim);
  double *last = NULL;  /* the excesses of the points in the k-th's bin of write_nearest's histogram */
  Listing listing = {malloc(sizeof(Node) * capacity), malloc((size_t)capacity * columns * size), capacity};
  char *nearest = malloc((size_t)columns * size);  /* the nearest point, as written out */
  int64_t *sums = malloc(sizeof(int64_t) * columns);
  int status = -1, n_axes = 0;
  for (int i = 0; i < dim; i++)  /* an axis of one point stays at coordinate 0 */
    if (counts[i] > 1) axes[n_axes++] = i, width[i] = counts[i] < k ? counts[i] : k > 2 ? k : 2, total += width[i];
  int64_t *coord_block = malloc(sizeof(int64_t) * (total + 1));
  double *excess_block = malloc(sizeof(double) * (total + 1));
  if (!order || !axes || !width || !excess || !coord || !cheapest || !listing.nodes || !listing.rows || !nearest
      || !sums || !coord_block || !excess_block)
    goto done;
  for (int j = 0, offset = 0; j < n_axes; offset += width[axes[j]], j++)
    coord[axes[j]] = coord_block + offset, excess[axes[j]] = excess_block + offset;
  for (int64_t b = 0; b < queries; b++) {
    const double *proto = protos + b * dim;
    memset(sums, 0, sizeof(int64_t) * columns);
    for (int j = 0; j < n_axes; j++) {
      int i = axes[j];
      rank_axis((proto[i] + 1.0) / steps[i], counts[i], steps[i], proto[i], width[i], coord[i], excess[i]);
      sums[column[i]] += weight[i] * coord[i][0];
      cheapest[j] = (Keyed){excess[i][1], i};
    }
    for (int j = 0; j < columns; j++) store(nearest, j, size, sums[j]);
    qsort(cheapest, n_axes, sizeof(Keyed), by_key);
    for (int j = 0; j < n_axes; j++) order[j] = cheapest[j].id;
    double bound = 0;  /* whole axes, in order, until their combinations number k */
    for (int64_t j = 0, points = 1; j < n_axes && points < k; j++) {
      int64_t w = width[order[j]], need = (k + points - 1) / points;
      bound += excess[order[j]][(need < w ? need : w) - 1];
      points = need < w ? k : points * w;
    }
    double loose = bound * (1.0 + 1e-12);
    bound = tighten(tighten(loose, k, n_axes, order, width, excess, count, next), k, n_axes, order, width, excess,
                    count, next);
    int64_t n = list_points(bound, n_axes, order, width, excess, coord, layout, nearest, &listing);
    if (n >= 0 && n < k) {
      bound = loose;
      n = list_points(bound, n_axes, order, width, excess, coord, layout, nearest, &listing);
    }
    if (n < k) { status = n < 0 ? -1 : -2; goto done; }
    double *grown = realloc(last, sizeof(double) * n);
    if (!grown) goto done;
    last = grown;
    size_t row_size = (size_t)columns * size;
    write_nearest(&listing, n, k, bound, row_size, last, (char *)out + b * k * row_size);
  }
  status = 0;
done:
  free(order), free(axes), free(width), free(excess), free(coord), free(last), free(cheapest);
  free(listing.nodes), free(listing.rows), free(nearest), free(sums), free(coord_block), free(excess_block);
  return status;
}
