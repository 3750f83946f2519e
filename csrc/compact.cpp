// In-place compaction of contiguous tensors along one dim (vitprune_fast._C).
//
// A tensor is viewed as [A, N, B] around `dim` (A = prod(shape[:dim]), B = prod(shape[dim+1:])). Keeping the
// sorted, unique indices idx[0..K) moves destination row (a, i) <- source row (a, idx[i]). In flat row order
// the destination a*K + i never exceeds the source a*N + idx[i], so processing rows in increasing order only
// moves data towards the front and never overwrites a row that is still to be read. The data ends up in the
// first A*K*B elements of the same storage; the Python side then shrinks the storage and fixes the shape.
//
// CPU: runs of consecutive kept indices become one memmove; independent tensors run in parallel.
// Other devices (CUDA): ATen ops only (so this file builds with plain g++), in chunks of rows gathered into a
// bounded temporary with index_select and copied back; a chunk's destinations can only overlap sources of
// the same chunk (already gathered) or rows that were already consumed.
//
// One tensor may appear several times in a batch: its steps are applied in order, each index referring to
// the shape left by the previous step. Everything is validated before any data moves, so an error leaves
// every tensor untouched.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

// Bumped whenever the Python-visible API changes; vitprune_fast/_ext.py refuses a stale build.
constexpr int64_t kApiVersion = 2;

// A tensor that does not qualify for in-place compaction (a view, shared storage, ...). Python sees it as
// NotCompactableError (a RuntimeError) and takes the plain-torch path: it is recognised by type, not message.
struct NotCompactable : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Smallest temporary for the chunked (device) path; the budget is max(this, tensor bytes / 16).
constexpr int64_t kMinChunkBytes = int64_t{4} << 20;

// Below this many bytes in total a batch is moved on the calling thread (threads cost more than they save).
constexpr int64_t kParallelMinBytes = int64_t{1} << 20;

// One compaction step of one tensor, with its geometry resolved against the shape left by earlier steps.
struct Step {
  int64_t A = 1, N = 1, B = 1;  // view [A, N, B] around the dim
  std::vector<int64_t> keep;    // sorted unique kept indices (copied off the index tensor)
};

// All steps of one distinct tensor.
struct Task {
  at::Tensor tensor;
  std::vector<Step> steps;
  int64_t bytes = 0;  // bytes of the tensor before the first step (for scheduling)
};

// Recent torch (PyObject preservation through a refcount bit): a storage's Python wrapper, once created (e.g. by
// Tensor.untyped_storage()), holds one strong reference for as long as any C++ reference exists. Older torch
// only borrows it, and has no PyObjectSlot::load_pyobj.
template <typename Slot, typename = void>
struct HasLoadPyobj : std::false_type {};
template <typename Slot>
struct HasLoadPyobj<Slot, std::void_t<decltype(std::declval<const Slot&>().load_pyobj())>> : std::true_type {};

// References to a storage held by its own Python wrapper (not by another tensor).
template <typename Slot>
int64_t wrapper_refs(const Slot* slot) {
  if constexpr (HasLoadPyobj<Slot>::value) {
    return slot->load_pyobj() != nullptr ? 1 : 0;
  } else {
    return 0;
  }
}

// Why a tensor cannot be compacted in place here; empty when it can.
std::string unsupported_reason(const at::Tensor& t) {
  if (!t.defined()) return "undefined tensor";
  if (t.layout() != at::kStrided) return "not a strided tensor";
  if (t.is_quantized()) return "quantized tensor";
  if (t.is_conj() || t.is_neg()) return "tensor with a conjugate/negative view bit";
  if (!t.has_storage()) return "tensor without storage";
  const auto dev = t.device().type();
  if (dev == at::kMeta) return "meta tensor (no data)";
  if (dev != at::kCPU && dev != at::kCUDA) return "device " + t.device().str() + " is not supported";
  if (!t.is_contiguous()) return "tensor is not contiguous";
  if (t.storage_offset() != 0) return "tensor has a storage offset";
  const auto& storage = t.storage();
  const int64_t nbytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (static_cast<int64_t>(storage.nbytes()) != nbytes) return "storage is larger than the tensor";
  if (!storage.resizable()) return "storage is not resizable (e.g. borrowed from numpy)";
  // Another tensor (a view, .data alias, autograd saved tensor, Python storage object) sees this storage:
  // moving its bytes and shrinking it would corrupt that tensor.
  const int64_t owners = 1 + wrapper_refs(storage.unsafeGetStorageImpl()->pyobj_slot());
  if (static_cast<int64_t>(storage.use_count()) != owners) return "storage is shared with another tensor";
  return {};
}

// Copies a 1-D int64 CPU index into a vector after checking it is non-empty, strictly increasing and < n.
std::vector<int64_t> checked_index(const at::Tensor& index, int64_t n, size_t item) {
  TORCH_CHECK_VALUE(index.defined(), "item ", item, ": index is undefined");
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong, "item ", item, ": index must be int64, got ",
                    index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, "item ", item, ": index must be 1-D, got ", index.dim(), "-D");
  TORCH_CHECK_VALUE(index.device().is_cpu(), "item ", item, ": index must be on the CPU, got ", index.device());
  TORCH_CHECK_VALUE(index.numel() > 0, "item ", item, ": index is empty (cannot remove every slice)");
  const at::Tensor idx = index.contiguous();
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t k = idx.numel();
  std::vector<int64_t> out(p, p + k);
  TORCH_CHECK_VALUE(out[0] >= 0 && out[k - 1] < n, "item ", item, ": index out of range [0, ", n, ")");
  for (int64_t i = 1; i < k; ++i) {
    TORCH_CHECK_VALUE(out[i] > out[i - 1], "item ", item, ": index must be strictly increasing (sorted, unique); ",
                      "position ", i, " has ", out[i], " after ", out[i - 1]);
  }
  return out;
}

// Groups the batch by tensor, resolves each step's geometry and validates everything up front.
std::vector<Task> build_tasks(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& dims,
                              const std::vector<at::Tensor>& indices) {
  TORCH_CHECK_VALUE(tensors.size() == dims.size() && tensors.size() == indices.size(),
                    "tensors, dims and indices must have the same length (got ", tensors.size(), ", ", dims.size(),
                    ", ", indices.size(), ")");
  std::vector<Task> tasks;
  std::vector<std::vector<int64_t>> shapes;           // current (logical) shape per task
  std::unordered_map<const void*, size_t> task_of;    // TensorImpl -> task
  for (size_t item = 0; item < tensors.size(); ++item) {
    const at::Tensor& t = tensors[item];
    const auto found = task_of.find(t.unsafeGetTensorImpl());
    size_t ti;
    if (found == task_of.end()) {
      const std::string why = unsupported_reason(t);
      if (!why.empty()) throw NotCompactable("item " + std::to_string(item) + ": cannot compact in place: " + why);
      ti = tasks.size();
      task_of.emplace(t.unsafeGetTensorImpl(), ti);
      tasks.push_back(Task{t, {}, t.numel() * static_cast<int64_t>(t.element_size())});
      shapes.push_back(t.sizes().vec());
    } else {
      ti = found->second;
    }
    std::vector<int64_t>& shape = shapes[ti];
    const auto ndim = static_cast<int64_t>(shape.size());
    TORCH_CHECK_VALUE(ndim > 0, "item ", item, ": cannot compact a 0-d tensor");
    int64_t dim = dims[item];
    TORCH_CHECK_VALUE(dim >= -ndim && dim < ndim, "item ", item, ": dim ", dim, " out of range for a ", ndim,
                      "-D tensor");
    if (dim < 0) dim += ndim;
    Step step;
    for (int64_t d = 0; d < dim; ++d) step.A *= shape[d];
    step.N = shape[dim];
    for (int64_t d = dim + 1; d < ndim; ++d) step.B *= shape[d];
    step.keep = checked_index(indices[item], step.N, item);
    shape[dim] = static_cast<int64_t>(step.keep.size());
    tasks[ti].steps.push_back(std::move(step));
  }
  return tasks;
}

// A row of 16 bytes, for the typed gather below.
struct Bytes16 {
  uint64_t lo, hi;
};

// Row-by-row forward gather for small rows (one typed load/store instead of a memmove call per short run).
// Safe in place for the same reason as the memmove: destination a*K+i <= source a*N+keep[i], increasing.
template <typename Row>
void gather_rows(char* base, const Step& s) {
  Row* data = reinterpret_cast<Row*>(base);
  const auto K = static_cast<int64_t>(s.keep.size());
  const int64_t* keep = s.keep.data();
  for (int64_t a = 0; a < s.A; ++a) {
    Row* dst = data + a * K;        // [K]
    const Row* src = data + a * s.N;  // [N]
    for (int64_t i = 0; i < K; ++i) {
      Row v;
      std::memcpy(&v, src + keep[i], sizeof(Row));  // memcpy of a fixed size: a plain load, no aliasing UB
      std::memcpy(dst + i, &v, sizeof(Row));
    }
  }
}

// CPU: memmove runs of consecutive kept rows, block by block, in increasing flat order.
void move_cpu(char* base, const Step& s, int64_t itemsize) {
  const auto K = static_cast<int64_t>(s.keep.size());
  if (K == s.N || s.A == 0 || s.B == 0) return;  // all kept, or nothing to move
  const int64_t row = s.B * itemsize;
  // Runs (destination row, source row, length) within one [N, B] block; the same for every block.
  std::vector<std::array<int64_t, 3>> runs;
  for (int64_t i = 0; i < K;) {
    int64_t j = i + 1;
    while (j < K && s.keep[j] == s.keep[j - 1] + 1) ++j;
    runs.push_back({i, s.keep[i], j - i});
    i = j;
  }
  // Short runs of small rows (e.g. pruning columns of a weight): a call per run would dominate.
  if (K * row < 64 * static_cast<int64_t>(runs.size())) {
    switch (row) {
      case 1: return gather_rows<uint8_t>(base, s);
      case 2: return gather_rows<uint16_t>(base, s);
      case 4: return gather_rows<uint32_t>(base, s);
      case 8: return gather_rows<uint64_t>(base, s);
      case 16: return gather_rows<Bytes16>(base, s);
      default: break;
    }
  }
  for (int64_t a = 0; a < s.A; ++a) {
    char* dst_block = base + a * K * row;  // block a of the result      [K, B]
    char* src_block = base + a * s.N * row;  // block a of the source    [N, B]
    for (const auto& r : runs) {
      char* dst = dst_block + r[0] * row;
      const char* src = src_block + r[1] * row;
      if (dst != src) std::memmove(dst, src, static_cast<size_t>(r[2] * row));
    }
  }
}

// Any device through ATen ops: gather bounded chunks of source rows, copy them to their destinations.
void move_chunked(const at::Tensor& t, const Step& s, int64_t chunk_bytes) {
  const auto K = static_cast<int64_t>(s.keep.size());
  if (K == s.N || s.A == 0 || s.B == 0) return;
  const int64_t itemsize = static_cast<int64_t>(t.element_size());
  // Rows view of the live prefix of the storage (earlier steps of this tensor already shrank the data).
  const at::Tensor rows = t.detach().view(-1).narrow(0, 0, s.A * s.N * s.B).view({s.A * s.N, s.B});  // [A*N, B]
  const int64_t total = s.A * K;  // destination rows
  // Destination rows before the first moved one are already in place (only possible in block 0).
  int64_t first = 0;
  while (first < K && s.keep[first] == first) ++first;

  const int64_t row_bytes = s.B * itemsize;
  const int64_t budget = chunk_bytes > 0 ? chunk_bytes : std::max(kMinChunkBytes, s.A * s.N * row_bytes / 16);
  const int64_t per_row = row_bytes + 4 * static_cast<int64_t>(sizeof(int64_t));  // data + index temporaries
  if (per_row > budget) {
    // Rows larger than the budget: a destination row differs from its source row, and distinct rows of a
    // contiguous view never overlap, so each row is copied directly (no temporary at all).
    for (int64_t f = first; f < total; ++f) {
      const int64_t src = (f / K) * s.N + s.keep[f % K];
      if (src != f) rows.select(0, f).copy_(rows.select(0, src));
    }
    return;
  }
  const int64_t chunk = std::min(budget / per_row, total - first);
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(t.device());
  const at::Tensor keep_dev = at::from_blob(const_cast<int64_t*>(s.keep.data()), {K}, at::kLong).to(t.device());  // [K]
  const at::Tensor tmp = at::empty({chunk, s.B}, t.options());  // [chunk, B]
  for (int64_t f0 = first; f0 < total; f0 += chunk) {
    const int64_t n = std::min(chunk, total - f0);
    at::Tensor src;  // [n] flat source row of each destination row
    if (s.A == 1) {
      src = keep_dev.narrow(0, f0, n);
    } else {
      const at::Tensor f = at::arange(f0, f0 + n, long_opts);
      src = at::floor_divide(f, K).mul_(s.N).add_(keep_dev.index_select(0, at::remainder(f, K)));
    }
    at::Tensor buf = tmp.narrow(0, 0, n);
    at::index_select_out(buf, rows, 0, src);
    rows.narrow(0, f0, n).copy_(buf);
  }
}

void run_task(const Task& task, bool force_chunked, int64_t chunk_bytes) {
  if (task.tensor.numel() == 0) return;
  const bool cpu = task.tensor.device().is_cpu() && !force_chunked;
  char* base = cpu ? static_cast<char*>(task.tensor.mutable_data_ptr()) : nullptr;
  for (const Step& s : task.steps) {
    if (cpu) {
      move_cpu(base, s, static_cast<int64_t>(task.tensor.element_size()));
    } else {
      move_chunked(task.tensor, s, chunk_bytes);
    }
  }
}

// Moves the data of every (tensor, dim, index) item; returns nothing (shapes are unchanged here).
void compact_many(const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& dims,
                  const std::vector<at::Tensor>& indices, bool force_chunked, int64_t chunk_bytes) {
  std::vector<Task> tasks = build_tasks(tensors, dims, indices);
  at::NoGradGuard no_grad;

  // Device tensors (and forced-chunked CPU ones) run on this thread, queued in order on their streams.
  std::vector<const Task*> cpu_tasks;
  int64_t cpu_bytes = 0;
  for (const Task& task : tasks) {
    if (task.tensor.device().is_cpu() && !force_chunked) {
      cpu_tasks.push_back(&task);
      cpu_bytes += task.bytes;
    } else {
      c10::DeviceGuard guard(task.tensor.device());
      run_task(task, force_chunked, chunk_bytes);
    }
  }
  if (cpu_tasks.empty()) return;

  const auto n_tasks = static_cast<int64_t>(cpu_tasks.size());
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), n_tasks);
  if (n_threads <= 1 || cpu_bytes < kParallelMinBytes) {
    for (const Task* task : cpu_tasks) run_task(*task, false, 0);
    return;
  }
  // Tensors differ in size by orders of magnitude: largest first, each thread pulls the next task when done
  // (parallel_for's static split of a range would leave one thread with all the big ones).
  std::stable_sort(cpu_tasks.begin(), cpu_tasks.end(), [](const Task* a, const Task* b) { return a->bytes > b->bytes; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t k = next++; k < n_tasks; k = next++) run_task(*cpu_tasks[k], false, 0);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vitprune_fast C++ extension: in-place compaction of tensors along a dim (data movement only).";
  m.attr("API_VERSION") = kApiVersion;
  py::register_exception<NotCompactable>(m, "NotCompactableError", PyExc_RuntimeError);
#ifdef INTRA_OP_PARALLEL
  m.attr("PARALLEL") = true;  // built with OpenMP: at::parallel_for really runs on several threads
#else
  m.attr("PARALLEL") = false;
#endif

  m.def(
      "unsupported_reason", [](const at::Tensor& t) { return unsupported_reason(t); }, py::arg("tensor"),
      "Why ``tensor`` cannot be compacted in place by this extension; an empty string when it can "
      "(contiguous CPU/CUDA tensor, storage offset 0, storage exactly its size, resizable and not shared).");

  m.def(
      "compact_many_",
      [](const std::vector<at::Tensor>& tensors, const std::vector<int64_t>& dims,
         const std::vector<at::Tensor>& indices, bool force_chunked, int64_t chunk_bytes) {
        compact_many(tensors, dims, indices, force_chunked, chunk_bytes);
      },
      py::arg("tensors"), py::arg("dims"), py::arg("indices"), py::arg("force_chunked") = false,
      py::arg("chunk_bytes") = 0, py::call_guard<py::gil_scoped_release>(),
      "Move the kept slices of every tensor to the front of its storage, in place.\n\n"
      "Item i keeps ``indices[i]`` (1-D int64 CPU, strictly increasing, in range, non-empty) along ``dims[i]``\n"
      "of ``tensors[i]``. A tensor listed several times gets its steps in order, each index referring to the\n"
      "shape left by the previous one. Afterwards the first prod(new_shape) elements of each storage hold the\n"
      "result; sizes and storage are unchanged (the caller shrinks them). Everything is validated before any\n"
      "data moves: ValueError for a bad index/dim, NotCompactableError (a RuntimeError) for a tensor that\n"
      "does not qualify.\n"
      "``force_chunked`` runs the device (ATen, chunked) algorithm on CPU tensors too and ``chunk_bytes`` sets\n"
      "its temporary budget (0: max(4 MiB, tensor/16)); both exist for tests.");

  m.def(
      "compact_",
      [](const at::Tensor& tensor, int64_t dim, const at::Tensor& index) {
        compact_many({tensor}, {dim}, {index}, false, 0);
      },
      py::arg("tensor"), py::arg("dim"), py::arg("index"), py::call_guard<py::gil_scoped_release>(),
      "Single-tensor form of compact_many_.");
}
