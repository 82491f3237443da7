// LayerNorm and RMSNorm forward and backward over the last dimension of a contiguous (rows, cols) tensor.
//
// Needs only the CUDA headers (no torch), so nvcc compiles it alone; csrc/norms.cpp binds it for torch.
// Every thread moves 16 bytes at a time when the row length and the pointers allow it (VEC elements),
// sums in fp32, and blocks reduce with warp shuffles. The backward writes dx row by row, then dweight and
// dbias come from per-block partial sums over chunks of rows and one final reduction over the chunks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace megaengine_norms {

enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
constexpr int kUnsupported = -1;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements moved as one aligned access: 16 bytes for VEC = 16 / sizeof(T), two for a float weight
// next to 2-byte activations.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_float(pack.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32; `shared` holds 32 floats.
// Each warp reduces the per-warp partials itself, so the result needs no broadcast.
__device__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : 0.f);
}

// One block per row. LayerNorm sums x - x[0] and its square in one pass (the shift keeps the variance from
// cancelling when the mean is large), then normalizes in a second pass over the row (served from cache).
template <typename T, typename W, int VEC>
__global__ void norm_forward_kernel(const T* __restrict__ x, const W* __restrict__ weight,
                                    const W* __restrict__ bias, T* __restrict__ y, float* __restrict__ mean_out,
                                    float* __restrict__ rstd_out, int64_t cols, float eps, bool rms) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const int64_t vecs = cols / VEC;
  const float shift = rms ? 0.f : to_float(xr[0]);
  float sum = 0.f, sum_sq = 0.f;
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    float v[VEC];
    load<T, VEC>(xr + i * VEC, v);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = v[k] - shift;
      sum += d;
      sum_sq += d * d;
    }
  }
  const float n = static_cast<float>(cols);
  sum_sq = block_sum(sum_sq, shared) / n;
  float mean = 0.f, var = sum_sq;
  if (!rms) {
    const float shifted_mean = block_sum(sum, shared) / n;
    mean = shift + shifted_mean;
    var = fmaxf(sum_sq - shifted_mean * shifted_mean, 0.f);
  }
  const float rstd = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    if (mean_out != nullptr) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    float v[VEC], w[VEC], b[VEC];
    load<T, VEC>(xr + i * VEC, v);
    load<W, VEC>(weight + i * VEC, w);
    if (bias != nullptr) {
      load<W, VEC>(bias + i * VEC, b);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) b[k] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean) * rstd * w[k] + b[k];
    store<T, VEC>(yr + i * VEC, v);
  }
}

// One block per row: dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)); RMSNorm drops the last term
// (and has mean 0).
template <typename T, typename W, int VEC>
__global__ void norm_backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                        const W* __restrict__ weight, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, T* __restrict__ dx, int64_t cols,
                                        bool rms) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  const T* dyr = dy + row * cols;
  T* dxr = dx + row * cols;
  const int64_t vecs = cols / VEC;
  const float mu = rms ? 0.f : mean[row];
  const float rs = rstd[row];
  float dot_xhat = 0.f, dot_one = 0.f;
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    float v[VEC], g[VEC], w[VEC];
    load<T, VEC>(xr + i * VEC, v);
    load<T, VEC>(dyr + i * VEC, g);
    load<W, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float wdy = w[k] * g[k];
      dot_xhat += (v[k] - mu) * rs * wdy;
      dot_one += wdy;
    }
  }
  const float n = static_cast<float>(cols);
  const float c1 = block_sum(dot_xhat, shared) / n;
  const float c2 = rms ? 0.f : block_sum(dot_one, shared) / n;
  for (int64_t i = threadIdx.x; i < vecs; i += blockDim.x) {
    float v[VEC], g[VEC], w[VEC];
    load<T, VEC>(xr + i * VEC, v);
    load<T, VEC>(dyr + i * VEC, g);
    load<W, VEC>(weight + i * VEC, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float xhat = (v[k] - mu) * rs;
      v[k] = (w[k] * g[k] - (xhat * c1 + c2)) * rs;
    }
    store<T, VEC>(dxr + i * VEC, v);
  }
}

constexpr int kPartialRowsPerBlock = 8;  // blockDim.y of the partial-sum kernel; blockDim.x is one warp

// Block (32, kPartialRowsPerBlock) owns a tile of 32 * VEC columns and one chunk of rows: each thread sums
// dy * xhat and dy down every kPartialRowsPerBlock-th row of the chunk for its VEC columns, then the block
// adds its rows of threads through shared memory and writes one row of partial sums for the chunk.
template <typename T, int VEC>
__global__ void norm_backward_partial_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                             const float* __restrict__ mean, const float* __restrict__ rstd,
                                             float* __restrict__ dw_part, float* __restrict__ db_part,
                                             int64_t rows, int64_t cols, int64_t rows_per_chunk, bool rms) {
  __shared__ float shared_w[kPartialRowsPerBlock][32 * VEC];
  __shared__ float shared_b[kPartialRowsPerBlock][32 * VEC];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x) * VEC;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t row_end = min(row_begin + rows_per_chunk, rows);
  float acc_w[VEC], acc_b[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc_w[k] = acc_b[k] = 0.f;
  if (col < cols) {
    for (int64_t row = row_begin + threadIdx.y; row < row_end; row += blockDim.y) {
      float v[VEC], g[VEC];
      load<T, VEC>(x + row * cols + col, v);
      load<T, VEC>(dy + row * cols + col, g);
      const float mu = rms ? 0.f : mean[row];
      const float rs = rstd[row];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        acc_w[k] += g[k] * (v[k] - mu) * rs;
        acc_b[k] += g[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    shared_w[threadIdx.y][threadIdx.x * VEC + k] = acc_w[k];
    shared_b[threadIdx.y][threadIdx.x * VEC + k] = acc_b[k];
  }
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
  for (int r = 1; r < kPartialRowsPerBlock; ++r) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_w[k] += shared_w[r][threadIdx.x * VEC + k];
      acc_b[k] += shared_b[r][threadIdx.x * VEC + k];
    }
  }
  const int64_t out = static_cast<int64_t>(blockIdx.y) * cols + col;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    dw_part[out + k] = acc_w[k];
    if (!rms) db_part[out + k] = acc_b[k];
  }
}

// out[c] = sum over chunks of part[chunk, c], one thread per column.
template <typename W>
__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t chunks, int64_t cols,
                                    W* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  float sum = 0.f;
  for (int64_t c = 0; c < chunks; ++c) sum += part[c * cols + col];
  out[col] = from_float<W>(sum);
}

// ---------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int row_threads(int64_t vecs) {
  const int64_t warps = (vecs + 31) / 32;
  return static_cast<int>(32 * (warps < 1 ? 1 : (warps > 16 ? 16 : warps)));
}

inline int sm_count() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}

// Chunks of rows for the partial sums: about four blocks per SM in all, never more than there are rows.
inline int64_t partial_chunks(int64_t rows, int64_t cols, int vec) {
  const int64_t tiles = (cols + 32 * vec - 1) / (32 * vec);
  int64_t chunks = (4 * static_cast<int64_t>(sm_count()) + tiles - 1) / tiles;
  chunks = chunks < 1 ? 1 : (chunks > rows ? rows : chunks);
  chunks = chunks > 65535 ? 65535 : chunks;
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  return (rows + per_chunk - 1) / per_chunk;
}

template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, typename W, int VEC>
cudaError_t forward_typed(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                          int64_t rows, int64_t cols, bool rms, float eps, cudaStream_t stream) {
  norm_forward_kernel<T, W, VEC><<<static_cast<unsigned>(rows), row_threads(cols / VEC), 0, stream>>>(
      static_cast<const T*>(x), static_cast<const W*>(weight), static_cast<const W*>(bias), static_cast<T*>(y),
      mean, rstd, cols, eps, rms);
  return cudaGetLastError();
}

template <typename T, typename W, int VEC>
cudaError_t backward_typed(const void* dy, const void* x, const void* weight, const float* mean, const float* rstd,
                           void* dx, void* dweight, void* dbias, float* workspace, int64_t rows, int64_t cols,
                           bool rms, cudaStream_t stream) {
  norm_backward_dx_kernel<T, W, VEC><<<static_cast<unsigned>(rows), row_threads(cols / VEC), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const W*>(weight), mean, rstd,
      static_cast<T*>(dx), cols, rms);
  const int64_t chunks = partial_chunks(rows, cols, vec_width<T>());  // as megaengine_norm_backward_chunks
  const int64_t per_chunk = (rows + chunks - 1) / chunks;
  float* dw_part = workspace;
  float* db_part = workspace + chunks * cols;
  const dim3 grid(static_cast<unsigned>((cols + 32 * VEC - 1) / (32 * VEC)), static_cast<unsigned>(chunks));
  norm_backward_partial_kernel<T, VEC><<<grid, dim3(32, kPartialRowsPerBlock), 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), mean, rstd, dw_part, db_part, rows, cols, per_chunk, rms);
  const unsigned col_blocks = static_cast<unsigned>((cols + 255) / 256);
  sum_partials_kernel<W><<<col_blocks, 256, 0, stream>>>(dw_part, chunks, cols, static_cast<W*>(dweight));
  if (!rms && dbias != nullptr) {
    sum_partials_kernel<W><<<col_blocks, 256, 0, stream>>>(db_part, chunks, cols, static_cast<W*>(dbias));
  }
  return cudaGetLastError();
}

// Picks the vector width (16-byte accesses when cols and every pointer allow them, else one element).
template <typename T, typename W>
cudaError_t forward_dispatch(const void* x, const void* weight, const void* bias, void* y, float* mean,
                             float* rstd, int64_t rows, int64_t cols, bool rms, float eps, cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const bool vectorized = cols % V == 0 && aligned(x, 16) && aligned(y, 16) && aligned(weight, V * sizeof(W)) &&
                          (bias == nullptr || aligned(bias, V * sizeof(W)));
  if (vectorized) return forward_typed<T, W, V>(x, weight, bias, y, mean, rstd, rows, cols, rms, eps, stream);
  return forward_typed<T, W, 1>(x, weight, bias, y, mean, rstd, rows, cols, rms, eps, stream);
}

template <typename T, typename W>
cudaError_t backward_dispatch(const void* dy, const void* x, const void* weight, const float* mean,
                              const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                              int64_t rows, int64_t cols, bool rms, cudaStream_t stream) {
  constexpr int V = vec_width<T>();
  const bool vectorized =
      cols % V == 0 && aligned(dy, 16) && aligned(x, 16) && aligned(dx, 16) && aligned(weight, V * sizeof(W));
  if (vectorized) {
    return backward_typed<T, W, V>(dy, x, weight, mean, rstd, dx, dweight, dbias, workspace, rows, cols, rms,
                                   stream);
  }
  return backward_typed<T, W, 1>(dy, x, weight, mean, rstd, dx, dweight, dbias, workspace, rows, cols, rms, stream);
}

// Weights are the activations' dtype or fp32 (fp32 master weights next to 16-bit activations).
#define MEGAENGINE_NORMS_DISPATCH(x_dtype, w_dtype, FN, ...)                                         \
  do {                                                                                               \
    if (x_dtype == kFloat32 && w_dtype == kFloat32) return FN<float, float>(__VA_ARGS__);           \
    if (x_dtype == kFloat16 && w_dtype == kFloat16) return FN<__half, __half>(__VA_ARGS__);         \
    if (x_dtype == kFloat16 && w_dtype == kFloat32) return FN<__half, float>(__VA_ARGS__);          \
    if (x_dtype == kBFloat16 && w_dtype == kBFloat16) return FN<__nv_bfloat16, __nv_bfloat16>(__VA_ARGS__); \
    if (x_dtype == kBFloat16 && w_dtype == kFloat32) return FN<__nv_bfloat16, float>(__VA_ARGS__);  \
    return kUnsupported;                                                                             \
  } while (0)

int vec_for(int x_dtype) { return x_dtype == kFloat32 ? vec_width<float>() : vec_width<__half>(); }

}  // namespace megaengine_norms

using namespace megaengine_norms;

// Returns 0 on success, -1 for an unsupported dtype pair, else the cudaError_t of the launch.
// `mean` may be null for RMSNorm; `bias` may be null.
extern "C" int megaengine_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean,
                                       float* rstd, int64_t rows, int64_t cols, int x_dtype, int w_dtype, int rms,
                                       float eps, cudaStream_t stream) {
  if (rows == 0) return 0;
  MEGAENGINE_NORMS_DISPATCH(x_dtype, w_dtype, forward_dispatch, x, weight, bias, y, mean, rstd, rows, cols,
                            rms != 0, eps, stream);
}

// Number of row chunks the backward sums dweight / dbias over; the workspace holds 2 * chunks * cols floats.
extern "C" int64_t megaengine_norm_backward_chunks(int64_t rows, int64_t cols, int x_dtype) {
  if (rows == 0) return 0;
  return partial_chunks(rows, cols, vec_for(x_dtype));
}

// dx, then dweight (and dbias unless RMSNorm or null) from per-chunk partial sums in `workspace`, which holds
// 2 * megaengine_norm_backward_chunks(rows, cols, x_dtype) * cols floats. `mean` may be null for RMSNorm.
extern "C" int megaengine_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                                        const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                                        int64_t rows, int64_t cols, int x_dtype, int w_dtype, int rms,
                                        cudaStream_t stream) {
  if (rows == 0) return 0;
  MEGAENGINE_NORMS_DISPATCH(x_dtype, w_dtype, backward_dispatch, dy, x, weight, mean, rstd, dx, dweight, dbias,
                            workspace, rows, cols, rms != 0, stream);
}
