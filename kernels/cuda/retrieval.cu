// CUDA kernels of mclx.kernels' GPU retrieval path (launched from gpu_select.py through
// CuPy RawModule). Self-contained: no #include, so NVRTC compiles this file as it is on a
// machine without a GPU (tests/test_cuda_kernels.py, part of `make test`).
//
// Layout: row-major float32 arrays; key indices are int (banks below 2^31 spots).
// Order of candidates everywhere: higher score first, ties to the lower key index, the
// CPU kernel's (cpu_select.py) and the float64 reference's order.

#define BLOCK 256          // threads per block of every kernel below
#define CAP 2048           // running top-m buffer per query row (shared memory)
#define SORT_MAX 1024      // best_k sorts at most this many candidates
#define NEG_INF __int_as_float(0xff800000)  // no math.h under NVRTC: -infinity by its bits
#define NO_INDEX 0x7FFFFFFF                  // padding sorts after every real key

// a (score, index) pair is better than another: higher score, then lower index
__device__ __forceinline__ bool better(float s, int i, float t, int j) {
    return s > t || (s == t && i < j);
}

// Block-wide bitonic sort of n = power of two entries (s, i, optional payload p) in
// shared memory, best first. Every thread of the block must call it.
__device__ void bitonic(float* s, int* i, float* p, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
                int lo = 2 * t - (t & (stride - 1));
                int hi = lo + stride;
                bool ascending = (lo & size) == 0;  // this half ends best first
                bool swap = ascending ? better(s[hi], i[hi], s[lo], i[lo])
                                      : better(s[lo], i[lo], s[hi], i[hi]);
                if (swap) {
                    float fs = s[lo]; s[lo] = s[hi]; s[hi] = fs;
                    int fi = i[lo]; i[lo] = i[hi]; i[hi] = fi;
                    if (p != nullptr) { float fp = p[lo]; p[lo] = p[hi]; p[hi] = fp; }
                }
            }
            __syncthreads();
        }
    }
}

// sum of v over the 32 lanes of a warp, in every lane
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    return v;
}

// Unit-normalise rows of src (rows x width) into float32 out; err[r] = the squared norm
// of the input row (non-finite when the row holds NaN or inf: the caller refuses it).
// One warp per row (coalesced reads).
extern "C" __global__ void unit_rows_f32(const float* __restrict__ src, float* __restrict__ out,
                                         float* __restrict__ err, int rows, int width) {
    long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;  // whole warps leave together
    const float* x = src + (size_t)r * width;
    float ss = 0.0f;
    for (int d = lane; d < width; d += 32) ss += x[d] * x[d];
    ss = warp_sum(ss);
    float inv = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
    for (int d = lane; d < width; d += 32) out[(size_t)r * width + d] = x[d] * inv;
    if (lane == 0) err[r] = ss;
}

// bfloat16 bits of a finite float32, rounded to nearest even (as torch rounds)
__device__ __forceinline__ unsigned short bf16_bits(float u) {
    unsigned int b = __float_as_uint(u);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// Unit-normalise rows into bfloat16 bits; err[r] = the length of row r's rounding error
// (non-finite for a NaN / inf row), which the exactness bound of the bf16 scores needs.
// One warp per row.
extern "C" __global__ void unit_rows_bf16(const float* __restrict__ src,
                                          unsigned short* __restrict__ out,
                                          float* __restrict__ err, int rows, int width) {
    long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float* x = src + (size_t)r * width;
    float ss = 0.0f;
    for (int d = lane; d < width; d += 32) ss += x[d] * x[d];
    ss = warp_sum(ss);
    float inv = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
    float e = 0.0f;
    for (int d = lane; d < width; d += 32) {
        float u = x[d] * inv;
        unsigned short h = bf16_bits(u);
        out[(size_t)r * width + d] = h;
        float back = __uint_as_float(((unsigned int)h) << 16);
        e += (back - u) * (back - u);
    }
    e = warp_sum(e);
    if (lane == 0) err[r] = isfinite(ss) ? sqrtf(e) : ss;
}

// Fold a tile of scores (rows x cols, row stride ld; column c is key start + c) into each
// row's running top-m: buf_s / buf_i (rows x CAP) hold count[r] entries, tau[r] is the
// row's threshold (the m-th best so far once the buffer was first cut, else -inf).
// One block per row reads each score once; a score that does not beat tau is skipped;
// survivors are appended and the buffer is cut back to its best m (a sort in shared
// memory) whenever the next BLOCK scores might not fit. Tiles come in increasing key
// order, so a later key that only ties tau never displaces an earlier one.
extern "C" __global__ void select_topm(const float* __restrict__ scores, int rows, int cols,
                                       int ld, int start, float* __restrict__ buf_s,
                                       int* __restrict__ buf_i, int* __restrict__ count,
                                       float* __restrict__ tau, int m) {
    __shared__ float ss[CAP];
    __shared__ int si[CAP];
    __shared__ int n;
    __shared__ float t;
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* row = scores + (size_t)r * ld;
    float* bs = buf_s + (size_t)r * CAP;
    int* bi = buf_i + (size_t)r * CAP;
    if (threadIdx.x == 0) { n = count[r]; t = tau[r]; }
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += blockDim.x) { ss[j] = bs[j]; si[j] = bi[j]; }
    __syncthreads();
    for (int base = 0; base < cols; base += blockDim.x) {
        int c = base + threadIdx.x;
        float th = t;
        if (c < cols) {
            float v = row[c];
            if (v > th) {  // NaN never passes (NaN keys are refused before)
                int at = atomicAdd(&n, 1);
                ss[at] = v;
                si[at] = start + c;
            }
        }
        __syncthreads();
        if (n > CAP - (int)blockDim.x) {  // the next pass could overflow: keep the best m
            for (int j = n + threadIdx.x; j < CAP; j += blockDim.x) {
                ss[j] = NEG_INF;
                si[j] = NO_INDEX;
            }
            __syncthreads();
            bitonic(ss, si, nullptr, CAP);
            if (threadIdx.x == 0) { n = m; t = ss[m - 1]; }
        }
        __syncthreads();
    }
    for (int j = threadIdx.x; j < n; j += blockDim.x) { bs[j] = ss[j]; bi[j] = si[j]; }
    if (threadIdx.x == 0) { count[r] = n; tau[r] = t; }
}

// Each row's best m of its buffer, sorted best first, into out_s / out_i (rows x m).
extern "C" __global__ void finish_topm(const float* __restrict__ buf_s,
                                       const int* __restrict__ buf_i,
                                       const int* __restrict__ count, float* __restrict__ out_s,
                                       int* __restrict__ out_i, int rows, int m) {
    __shared__ float ss[CAP];
    __shared__ int si[CAP];
    int r = blockIdx.x;
    if (r >= rows) return;
    int n = count[r];
    for (int j = threadIdx.x; j < CAP; j += blockDim.x) {
        bool in = j < n;
        ss[j] = in ? buf_s[(size_t)r * CAP + j] : NEG_INF;
        si[j] = in ? buf_i[(size_t)r * CAP + j] : NO_INDEX;
    }
    __syncthreads();
    bitonic(ss, si, nullptr, CAP);
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        out_s[(size_t)r * m + j] = ss[j];
        out_i[(size_t)r * m + j] = si[j];
    }
}

// Exact float32 cosine and L1 (order 1) or L2 (order 2) distance of each query to each of
// its m candidates: one warp per (query, candidate), coalesced reads of both rows.
extern "C" __global__ void rescore(const float* __restrict__ q, const float* __restrict__ keys,
                                   const int* __restrict__ cand, float* __restrict__ cos,
                                   float* __restrict__ dist, int rows, int m, int width,
                                   int order) {
    long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (w >= (long long)rows * m) return;  // whole warps leave together
    const float* qr = q + (size_t)(w / m) * width;
    const float* kr = keys + (size_t)cand[w] * width;
    float dot = 0.0f, qq = 0.0f, kk = 0.0f, acc = 0.0f;
    for (int d = lane; d < width; d += 32) {
        float x = kr[d], y = qr[d];
        dot += x * y;
        qq += y * y;
        kk += x * x;
        float diff = x - y;
        acc += order == 2 ? diff * diff : fabsf(diff);
    }
    for (int o = 16; o > 0; o >>= 1) {
        dot += __shfl_down_sync(0xFFFFFFFFu, dot, o);
        qq += __shfl_down_sync(0xFFFFFFFFu, qq, o);
        kk += __shfl_down_sync(0xFFFFFFFFu, kk, o);
        acc += __shfl_down_sync(0xFFFFFFFFu, acc, o);
    }
    if (lane == 0) {
        cos[w] = dot / (fmaxf(sqrtf(qq), 1e-12f) * fmaxf(sqrtf(kk), 1e-12f));
        dist[w] = order == 2 ? sqrtf(acc) : acc;
    }
}

// Each row's best k of its m re-scored candidates (m <= SORT_MAX), best first, with
// their indices and distances.
extern "C" __global__ void best_k(const float* __restrict__ cos, const int* __restrict__ cand,
                                  const float* __restrict__ dist, float* __restrict__ out_cos,
                                  int* __restrict__ out_idx, float* __restrict__ out_dist,
                                  int rows, int m, int k) {
    __shared__ float ss[SORT_MAX];
    __shared__ int si[SORT_MAX];
    __shared__ float sd[SORT_MAX];
    int r = blockIdx.x;
    if (r >= rows) return;
    int n = 1;
    while (n < m) n <<= 1;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        bool in = j < m;
        ss[j] = in ? cos[(size_t)r * m + j] : NEG_INF;
        si[j] = in ? cand[(size_t)r * m + j] : NO_INDEX;
        sd[j] = in ? dist[(size_t)r * m + j] : 0.0f;
    }
    __syncthreads();
    bitonic(ss, si, sd, n);
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        out_cos[(size_t)r * k + j] = ss[j];
        out_idx[(size_t)r * k + j] = si[j];
        out_dist[(size_t)r * k + j] = sd[j];
    }
}

// Weights over each row's k neighbours from their distances, each row summing to 1:
// inverse_square (mean = 0): (d_min / d)^2 normalised, so nothing overflows; a row with
// exact matches (d = 0) shares all weight among them. mean = 1: uniform. Double
// precision, as the torch path; one thread per row.
extern "C" __global__ void weights_rows(const float* __restrict__ dist, float* __restrict__ w,
                                        int rows, int k, int mean) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* d = dist + (size_t)r * k;
    float* out = w + (size_t)r * k;
    if (mean) {
        for (int j = 0; j < k; ++j) out[j] = (float)(1.0 / k);
        return;
    }
    double dmin = d[0];
    for (int j = 1; j < k; ++j) dmin = fmin(dmin, (double)d[j]);
    double total = 0.0;
    for (int j = 0; j < k; ++j) {
        double x = (double)d[j];
        total += dmin == 0.0 ? (x == 0.0 ? 1.0 : 0.0) : (dmin / x) * (dmin / x);
    }
    for (int j = 0; j < k; ++j) {
        double x = (double)d[j];
        double v = dmin == 0.0 ? (x == 0.0 ? 1.0 : 0.0) : (dmin / x) * (dmin / x);
        out[j] = (float)(v / total);
    }
}

// out[r, g] = sum_j w[r, j] * values[idx[r, j], g], float32 accumulation; block x = row,
// block y and threads = genes (coalesced reads of each neighbour's expression row).
extern "C" __global__ void aggregate_rows(const float* __restrict__ w, const int* __restrict__ idx,
                                          const float* __restrict__ values,
                                          float* __restrict__ out, int rows, int k, int genes) {
    int r = blockIdx.x;
    int g = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= rows || g >= genes) return;
    const float* wr = w + (size_t)r * k;
    const int* ir = idx + (size_t)r * k;
    float acc = 0.0f;
    for (int j = 0; j < k; ++j) acc += wr[j] * values[(size_t)ir[j] * genes + g];
    out[(size_t)r * genes + g] = acc;
}
