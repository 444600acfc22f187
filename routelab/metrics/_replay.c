/*
 * Replay kernels for routing traces (compiled on first use by routelab.metrics.replay).
 *
 * rl_stack_replay: one pass of a priority stack (Mattson, Gecsei, Slutz & Traiger 1970,
 *   "Evaluation techniques for storage hierarchies") over an expert-access trace, giving the
 *   hit and load counts of a demand-paging cache of every size at once. Policies evict the
 *   resident with the lowest priority (hi, lo), compared lexicographically:
 *     0 LRU     (last access, 0)
 *     1 LFU     (total accesses so far, last access): perfect LFU, counts survive eviction
 *     2 Belady  (-next access index, 0); never used again -> -(N + 1 + id)
 *     3 SCH     (occurrences in the next `future_len` steps not yet consumed, last access)
 *   Hit accounting follows moe-lrc (Liang et al., arXiv 2505.16056, src/41_sch_calc.py,
 *   src/50_chr_calc.py): every access of step t is checked against the stack before step t;
 *   a first-ever access while fewer distinct items than the cache size have been seen is a
 *   hit (free warm-up). keep_hist counts, at update time, the stack depth of the accessed
 *   item, i.e. for which cache sizes no load was needed.
 *
 * rl_srp_hist: histogram over (window, item) of the number of steps in a sliding window of
 *   `window` steps that access the item (moe-lrc src/30_srp_calc.py), windows inside segments;
 *   summed over segments, or one histogram per segment when per_segment is set.
 *
 * rl_lru_prefetch: an LRU cache of one size that, before each step's demand accesses,
 *   inserts a predicted (prefetched) item list; counts demand hits/loads and prefetch
 *   loads/useful prefetches, and the loads of every step.
 *
 * ids are int32 [n_steps * k], -1 = empty slot; segments [seg_off[s], seg_off[s+1]) are
 * replayed from an empty cache. Return 0 on success, -1 on allocation failure.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t *stack;   /* stack[0] = highest level */
    int32_t *where;   /* position of an item in the stack, -1 = not in it */
    int64_t *hi, *lo; /* priority of each item */
} rl_stack;

static inline int rl_higher(const rl_stack *s, int32_t a, int32_t b) {
    return s->hi[a] > s->hi[b] || (s->hi[a] == s->hi[b] && s->lo[a] > s->lo[b]);
}

/* Move x to the top; displaced items bubble down, the lower priority one going deeper.
   Returns the new stack depth (the number of distinct items seen). */
static inline int32_t rl_access(rl_stack *s, int32_t x, int32_t depth, int policy) {
    int32_t pos = s->where[x];
    if (pos == 0) return depth;
    int32_t end = pos >= 0 ? pos : depth; /* levels 0..end-1 are displaced */
    if (policy == 0) {
        /* LRU: the displaced item is always the more recent one, so the bubble is a shift. */
        memmove(s->stack + 1, s->stack, (size_t)end * sizeof(int32_t));
        for (int32_t i = 1; i <= end; i++) s->where[s->stack[i]] = i;
    } else if (end > 0) {
        int32_t y = s->stack[0];
        for (int32_t i = 1; i < end; i++) {
            int32_t z = s->stack[i];
            if (rl_higher(s, y, z)) {
                s->stack[i] = y;
                s->where[y] = i;
                y = z;
            }
        }
        s->stack[end] = y;
        s->where[y] = end;
    }
    s->stack[0] = x;
    s->where[x] = 0;
    return pos < 0 ? depth + 1 : depth;
}

int rl_stack_replay(const int32_t *ids, int64_t n_steps, int32_t k, int32_t n_items, const int64_t *seg_off,
                    int64_t n_segs, int32_t policy, int64_t future_len, int64_t *hit_hist, int64_t *keep_hist) {
    (void)n_steps;
    rl_stack s;
    s.stack = malloc(sizeof(int32_t) * (size_t)n_items);
    s.where = malloc(sizeof(int32_t) * (size_t)n_items);
    s.hi = malloc(sizeof(int64_t) * (size_t)n_items);
    s.lo = malloc(sizeof(int64_t) * (size_t)n_items);
    int64_t *count = malloc(sizeof(int64_t) * (size_t)n_items);
    int32_t *before = malloc(sizeof(int32_t) * (size_t)(k > 0 ? k : 1));
    int64_t max_len = 0;
    for (int64_t g = 0; g < n_segs; g++)
        if (seg_off[g + 1] - seg_off[g] > max_len) max_len = seg_off[g + 1] - seg_off[g];
    int64_t *next_use = policy == 2 ? malloc(sizeof(int64_t) * (size_t)(max_len * k + 1)) : NULL;
    int64_t *last_seen = policy == 2 ? malloc(sizeof(int64_t) * (size_t)n_items) : NULL;
    if (!s.stack || !s.where || !s.hi || !s.lo || !count || !before || (policy == 2 && (!next_use || !last_seen))) {
        free(s.stack); free(s.where); free(s.hi); free(s.lo); free(count); free(before); free(next_use); free(last_seen);
        return -1;
    }
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t t0 = seg_off[g], t1 = seg_off[g + 1];
        int64_t *hits = hit_hist + g * n_items, *keeps = keep_hist + g * n_items;
        for (int32_t e = 0; e < n_items; e++) {
            s.where[e] = -1;
            s.hi[e] = 0;
            s.lo[e] = 0;
            count[e] = 0;
        }
        if (policy == 2) {
            /* next access index (per access) of the same item; sentinels order unused items by id */
            int64_t n_acc = 0;
            for (int64_t t = t0; t < t1; t++)
                for (int32_t j = 0; j < k; j++) n_acc += ids[t * k + j] >= 0;
            for (int32_t e = 0; e < n_items; e++) last_seen[e] = n_acc + 1 + e;
            int64_t a = n_acc;
            for (int64_t t = t1 - 1; t >= t0; t--)
                for (int32_t j = k - 1; j >= 0; j--) {
                    int32_t x = ids[t * k + j];
                    if (x < 0) continue;
                    a--;
                    next_use[a] = last_seen[x];
                    last_seen[x] = a + 1;
                }
        }
        if (policy == 3) {
            int64_t stop = t0 + future_len < t1 ? t0 + future_len : t1;
            for (int64_t t = t0; t < stop; t++)
                for (int32_t j = 0; j < k; j++)
                    if (ids[t * k + j] >= 0) count[ids[t * k + j]]++;
        }
        int32_t depth = 0, uni = 0;
        int64_t ts = 0;
        for (int64_t t = t0; t < t1; t++) {
            const int32_t *row = ids + t * k;
            for (int32_t j = 0; j < k; j++) before[j] = row[j] >= 0 ? s.where[row[j]] : -2;
            for (int32_t j = 0; j < k; j++) {
                if (before[j] == -2) continue;
                if (before[j] >= 0) hits[before[j]]++;
                else hits[uni++]++;
            }
            for (int32_t j = 0; j < k; j++) {
                int32_t x = row[j];
                if (x < 0) continue;
                if (s.where[x] >= 0) keeps[s.where[x]]++;
                depth = rl_access(&s, x, depth, policy);
                ts++;
                switch (policy) {
                    case 0: s.hi[x] = ts; break;
                    case 1: s.hi[x] = ++count[x]; s.lo[x] = ts; break;
                    case 2: s.hi[x] = -next_use[ts - 1]; break;
                    default: s.hi[x] = --count[x]; s.lo[x] = ts; break;
                }
            }
            if (policy == 3 && t + future_len < t1) {
                const int32_t *ahead = ids + (t + future_len) * k;
                for (int32_t j = 0; j < k; j++) {
                    int32_t x = ahead[j];
                    if (x < 0) continue;
                    count[x]++;
                    if (s.where[x] >= 0) s.hi[x] = count[x];
                }
            }
        }
    }
    free(s.stack); free(s.where); free(s.hi); free(s.lo); free(count); free(before); free(next_use); free(last_seen);
    return 0;
}

int rl_srp_hist(const int32_t *ids, int64_t n_steps, int32_t k, int32_t n_items, const int64_t *seg_off,
                int64_t n_segs, int64_t window, int32_t per_segment, int64_t *hist_out) {
    (void)n_steps;
    int64_t *cnt = malloc(sizeof(int64_t) * (size_t)n_items);
    int64_t *since = malloc(sizeof(int64_t) * (size_t)n_items);
    if (!cnt || !since) { free(cnt); free(since); return -1; }
    for (int64_t g = 0; g < n_segs; g++) {
        const int64_t t0 = seg_off[g], n = seg_off[g + 1] - t0;
        int64_t *hist = hist_out + (per_segment ? g * (window + 1) : 0);
        if (n < window) continue;
        const int64_t n_windows = n - window + 1;
        for (int32_t e = 0; e < n_items; e++) { cnt[e] = 0; since[e] = 0; }
        for (int64_t t = t0; t < t0 + window; t++)
            for (int32_t j = 0; j < k; j++)
                if (ids[t * k + j] >= 0) cnt[ids[t * k + j]]++;
        for (int64_t w = 0; w + 1 < n_windows; w++) {
            const int32_t *out = ids + (t0 + w) * k, *in = ids + (t0 + w + window) * k;
            for (int32_t j = 0; j < k; j++) {
                int32_t x = out[j];
                if (x < 0) continue;
                hist[cnt[x]] += w + 1 - since[x];
                since[x] = w + 1;
                cnt[x]--;
            }
            for (int32_t j = 0; j < k; j++) {
                int32_t x = in[j];
                if (x < 0) continue;
                hist[cnt[x]] += w + 1 - since[x];
                since[x] = w + 1;
                cnt[x]++;
            }
        }
        for (int32_t e = 0; e < n_items; e++) hist[cnt[e]] += n_windows - since[e];
    }
    free(cnt); free(since);
    return 0;
}

int rl_lru_prefetch(const int32_t *demand, int32_t k, const int32_t *prefetch, int32_t m, int32_t n_items,
                    const int64_t *seg_off, int64_t n_segs, int32_t cache_size, int64_t *totals,
                    int32_t *step_demand_loads, int32_t *step_prefetch_loads) {
    /* totals: [0] demand accesses, [1] demand hits, [2] demand loads, [3] prefetch loads,
       [4] prefetched items later used by a demand access before eviction */
    int64_t *last = malloc(sizeof(int64_t) * (size_t)n_items);
    char *resident = malloc((size_t)n_items);
    char *unused_prefetch = malloc((size_t)n_items);
    int32_t *slots = malloc(sizeof(int32_t) * (size_t)(cache_size > 0 ? cache_size : 1));
    int32_t *before = malloc(sizeof(int32_t) * (size_t)(k > 0 ? k : 1));
    if (!last || !resident || !unused_prefetch || !slots || !before) {
        free(last); free(resident); free(unused_prefetch); free(slots); free(before);
        return -1;
    }
    for (int64_t g = 0; g < n_segs; g++) {
        memset(resident, 0, (size_t)n_items);
        memset(unused_prefetch, 0, (size_t)n_items);
        int32_t used = 0;
        int64_t ts = 0;
        for (int64_t t = seg_off[g]; t < seg_off[g + 1]; t++) {
            int32_t loads_p = 0, loads_d = 0;
            /* insert one item (evicting the least recently used resident), protected items not evicted */
#define RL_INSERT(X, FROM_PREFETCH)                                                     \
    do {                                                                                \
        int32_t x_ = (X);                                                               \
        if (!resident[x_]) {                                                            \
            if (used < cache_size) {                                                    \
                slots[used++] = x_;                                                     \
            } else {                                                                    \
                int32_t victim = 0;                                                     \
                for (int32_t i_ = 1; i_ < used; i_++)                                   \
                    if (last[slots[i_]] < last[slots[victim]]) victim = i_;             \
                resident[slots[victim]] = 0;                                            \
                unused_prefetch[slots[victim]] = 0;                                     \
                slots[victim] = x_;                                                     \
            }                                                                           \
            resident[x_] = 1;                                                           \
            unused_prefetch[x_] = (FROM_PREFETCH);                                      \
            if (FROM_PREFETCH) loads_p++; else loads_d++;                               \
        }                                                                               \
        last[x_] = ++ts;                                                                \
    } while (0)
            for (int32_t j = 0; j < m; j++) {
                int32_t x = prefetch[t * m + j];
                if (x >= 0) RL_INSERT(x, 1);
            }
            const int32_t *row = demand + t * k;
            for (int32_t j = 0; j < k; j++) before[j] = row[j] >= 0 ? resident[row[j]] : -1;
            for (int32_t j = 0; j < k; j++) {
                int32_t x = row[j];
                if (x < 0) continue;
                totals[0]++;
                if (before[j] == 1) totals[1]++;
                if (unused_prefetch[x] && resident[x]) { totals[4]++; unused_prefetch[x] = 0; }
                RL_INSERT(x, 0);
            }
#undef RL_INSERT
            totals[2] += loads_d;
            totals[3] += loads_p;
            step_demand_loads[t] = loads_d;
            step_prefetch_loads[t] = loads_p;
        }
    }
    free(last); free(resident); free(unused_prefetch); free(slots); free(before);
    return 0;
}
