// Torch binding for csrc/norms.cu: checks tensors, allocates outputs and the partial-sum workspace, and calls
// the extern "C" launchers on the current CUDA stream. Built by megaengine/kernels/cuda.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>

#include <vector>

extern "C" {
int megaengine_norm_forward(const void* x, const void* weight, const void* bias, void* y, float* mean, float* rstd,
                            int64_t rows, int64_t cols, int x_dtype, int w_dtype, int rms, float eps,
                            cudaStream_t stream);
int64_t megaengine_norm_backward_chunks(int64_t rows, int64_t cols, int x_dtype);
int megaengine_norm_backward(const void* dy, const void* x, const void* weight, const float* mean,
                             const float* rstd, void* dx, void* dweight, void* dbias, float* workspace,
                             int64_t rows, int64_t cols, int x_dtype, int w_dtype, int rms, cudaStream_t stream);
}

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "megaengine norms: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.is_contiguous(), "megaengine norms: ", name,
              " must be a contiguous 2-d CUDA tensor");
}

void check_vector(const at::Tensor& t, const at::Tensor& x, int64_t size, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device() && t.dim() == 1 && t.size(0) == size && t.is_contiguous(),
              "megaengine norms: ", name, " must be a contiguous 1-d CUDA tensor of size ", size,
              " on x's device");
}

void check_status(int status, const char* what) {
  TORCH_CHECK(status != -1, "megaengine norms ", what,
              ": unsupported dtypes (weights must be x's dtype or float32)");
  TORCH_CHECK(status == 0, "megaengine norms ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
}

// Returns (y, mean, rstd); mean is empty for RMSNorm.
std::vector<at::Tensor> norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const c10::optional<at::Tensor>& bias, double eps, bool rms) {
  check_rows(x, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  check_vector(weight, x, cols, "weight");
  if (bias.has_value()) {
    check_vector(*bias, x, cols, "bias");
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "megaengine norms: bias and weight dtypes differ");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  auto stats = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rms ? 0 : rows}, stats);
  at::Tensor rstd = at::empty({rows}, stats);
  const int status = megaengine_norm_forward(
      x.data_ptr(), weight.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(),
      rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows, cols, dtype_code(x),
      dtype_code(weight), rms ? 1 : 0, static_cast<float>(eps), c10::cuda::getCurrentCUDAStream().stream());
  check_status(status, "forward");
  return {y, mean, rstd};
}

// Returns (dx, dweight, dbias); dbias is empty for RMSNorm.
std::vector<at::Tensor> norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool rms) {
  check_rows(x, "x");
  check_rows(dy, "dy");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "megaengine norms: dy must match x in shape and dtype");
  const int64_t rows = x.size(0), cols = x.size(1);
  check_vector(weight, x, cols, "weight");
  check_vector(rstd, x, rows, "rstd");
  if (!rms) check_vector(mean, x, rows, "mean");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && (rms || mean.scalar_type() == at::kFloat),
              "megaengine norms: mean and rstd must be float32");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  at::Tensor dweight = at::empty_like(weight);
  at::Tensor dbias = rms ? at::empty({0}, weight.options()) : at::empty_like(weight);
  const int64_t chunks = megaengine_norm_backward_chunks(rows, cols, dtype_code(x));
  at::Tensor workspace = at::empty({2 * chunks * cols}, x.options().dtype(at::kFloat));
  if (rows == 0) {
    dweight.zero_();
    dbias.zero_();
    return {dx, dweight, dbias};
  }
  const int status = megaengine_norm_backward(
      dy.data_ptr(), x.data_ptr(), weight.data_ptr(), rms ? nullptr : mean.data_ptr<float>(),
      rstd.data_ptr<float>(), dx.data_ptr(), dweight.data_ptr(), rms ? nullptr : dbias.data_ptr(),
      workspace.data_ptr<float>(), rows, cols, dtype_code(x), dtype_code(weight), rms ? 1 : 0,
      c10::cuda::getCurrentCUDAStream().stream());
  check_status(status, "backward");
  return {dx, dweight, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_forward", &norm_forward, "LayerNorm / RMSNorm forward: (y, mean, rstd)");
  m.def("norm_backward", &norm_backward, "LayerNorm / RMSNorm backward: (dx, dweight, dbias)");
}
