#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>

#include <ATen/ThreadLocalState.h>

#include <syncbn/data_parallel.h>
#include <syncbn/replica_wait.h>

#include "bindings.h"

namespace syncbn::python {

namespace py = pybind11;

namespace {

// ATen's state of the thread that made it: grad and inference mode, autocast, the profiler's callbacks, saved-tensor
// hooks, Python dispatch and torch-function modes... What torch's own autograd threads and at::launch carry from the
// thread that starts the work to the thread that does it.
struct CapturedThreadState {
  at::ThreadLocalState state;
};

// Installs a captured state in the thread that enters it, and restores that thread's own state on exit.
class AppliedThreadState {
 public:
  explicit AppliedThreadState(std::shared_ptr<const CapturedThreadState> captured) : captured_(std::move(captured)) {}
  void enter() { guard_.emplace(captured_->state); }
  void exit() { guard_.reset(); }

 private:
  std::shared_ptr<const CapturedThreadState> captured_;
  std::optional<at::ThreadLocalStateGuard> guard_;
};

}  // namespace

void bind_thread_state(py::module_& m) {
  py::class_<AppliedThreadState>(m, "_AppliedThreadState")
      .def("__enter__", [](AppliedThreadState& self) { self.enter(); })
      .def("__exit__", [](AppliedThreadState& self, const py::args&) {
        self.exit();
        return false;
      });
  py::class_<CapturedThreadState, std::shared_ptr<CapturedThreadState>>(
      m, "ThreadLocalState",
      "ATen's thread-local state of the thread that creates it (grad and inference mode, autocast, the profiler, "
      "saved-tensor hooks, Python dispatch and torch-function modes), as torch carries it to its own worker threads.")
      .def(py::init<>())
      .def(
          "applied",
          [](const std::shared_ptr<CapturedThreadState>& self) { return std::make_unique<AppliedThreadState>(self); },
          "A context manager that installs this state in the thread entering it, and restores that thread's own "
          "on exit.");
  m.def("set_thread_intra_op_threads", &syncbn::set_thread_intra_op_threads, py::arg("threads"),
        "Sets the calling thread's own intra-op thread count (OpenMP's per-thread count), where "
        "torch.set_num_threads also sets the count every thread started later takes. Returns False, changing "
        "nothing, when torch has no OpenMP.");

  using syncbn::detail::ReplicaWaitPolicy;
  py::class_<ReplicaWaitPolicy>(
      m, "ReplicaWaitPolicy",
      "How long a parallel apply waits for its replicas, the C++ data_parallel's policy: until every one reported, "
      "but once one failed FAILURE_GRACE_SECONDS more at most, and once one returned `timeout_seconds` more at most "
      "(none above 1e9), counted from the end of a later wait for other ranks.")
      .def(py::init<double>(), py::arg("timeout_seconds"))
      .def("returned", &ReplicaWaitPolicy::returned, "A replica returned (the first starts the timeout).")
      .def("failed", &ReplicaWaitPolicy::failed, "A replica failed (the first starts the grace period).")
      .def_property_readonly("any_failed", &ReplicaWaitPolicy::any_failed, "Whether a replica failed.")
      .def(
          "seconds_left",
          [](const ReplicaWaitPolicy& self) -> std::optional<double> {
            const auto deadline = self.deadline();
            if (!deadline) return std::nullopt;
            const double left = std::chrono::duration<double>(*deadline - ReplicaWaitPolicy::Clock::now()).count();
            return std::max(0.0, left);
          },
          "Seconds until the wait's bound (0 once it passed); None: no bound yet.")
      .def("renew", &ReplicaWaitPolicy::renew,
           "Once the bound passed: True to wait on (a wait for other ranks ended after the timeout's start, which "
           "now counts from that end), False to give up.");
  m.attr("FAILURE_GRACE_SECONDS") = syncbn::detail::kFailureGraceSeconds;
}

}  // namespace syncbn::python
