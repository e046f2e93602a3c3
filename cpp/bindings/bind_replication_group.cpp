#include <syncbn/replication_group.h>

#include "barrier_controls.h"
#include "bindings.h"

namespace syncbn::python {

namespace py = pybind11;

namespace {

// `with group.replica(copy_id):` marks the calling thread as running that copy (ReplicaScope).
struct PyReplicaScope {
  std::shared_ptr<ReplicationGroup> group;
  int64_t copy_id;
  std::unique_ptr<ReplicaScope> scope;
};

}  // namespace

void bind_replication_group(py::module_& m) {
  py::class_<PyReplicaScope>(m, "ReplicaScope",
                             "While entered, the calling thread runs copy `copy_id` of its replication: once the "
                             "replication is closed, every barrier pass the thread starts is refused.")
      .def("__enter__",
           [](PyReplicaScope& self) -> PyReplicaScope& {
             if (self.scope) throw py::value_error("ReplicaScope is already entered");
             self.scope = std::make_unique<ReplicaScope>(self.group, self.copy_id);
             return self;
           })
      .def("__exit__", [](PyReplicaScope& self, const py::args&) {
        self.scope.reset();
        return false;
      });

  py::class_<ReplicationGroup, std::shared_ptr<ReplicationGroup>>(
      m, "ReplicationGroup",
      "What one replication shares: storage, the barriers told when a copy's forward returns or fails, and whether "
      "the replication is alive.")
      .def_property_readonly("copies", &ReplicationGroup::copies)
      .def_property_readonly(
          "shared", [](ReplicationGroup& self) { return self.shared_context(); },
          "A CallbackContext shared by every position and copy of the replication.")
      .def(
          "add_barrier",
          [](ReplicationGroup& self, const py::object& barrier) {
            std::shared_ptr<SyncMaster> core = barrier_core(barrier);
            py::gil_scoped_release no_gil;
            self.add_barrier(std::move(core));
          },
          py::arg("barrier"),
          "A SyncMaster (or BatchNormSyncMaster) the replicas use: copy_finished, abort and close reach it.")
      .def("copy_finished", &ReplicationGroup::copy_finished, py::arg("copy_id"),
           py::call_guard<py::gil_scoped_release>(), "Copy `copy_id`'s forward returned: it sends no more messages.")
      .def("abort", &ReplicationGroup::abort, py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
           "Wakes everyone waiting on the replication's barriers with BarrierAbortedError.")
      .def("close", &ReplicationGroup::close, py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
           "Ends the replication for good: waiters wake, and every later barrier pass, statistics update or buffer "
           "write of its replicas is refused with BarrierAbortedError.")
      .def_property_readonly("closed", &ReplicationGroup::closed)
      .def_property_readonly("close_reason", &ReplicationGroup::close_reason)
      .def_property(
          "parallel_backward", [](const ReplicationGroup& self) { return self.backward()->parallel(); },
          [](const ReplicationGroup& self, bool parallel) { self.backward()->set_parallel(parallel); },
          "Whether each replica's backward runs on a thread of its own (its synchronized layers then meet in "
          "backward); default False.")
      .def(
          "begin_backward", [](const ReplicationGroup& self) { self.backward()->begin_run(); },
          py::call_guard<py::gil_scoped_release>(), "A parallel backward run starts.")
      .def(
          "backward_done", [](const ReplicationGroup& self, int64_t copy_id) { self.backward()->copy_done(copy_id); },
          py::arg("copy_id"), py::call_guard<py::gil_scoped_release>(),
          "Copy `copy_id`'s backward task of this run ended: nobody waits for it any more.")
      .def("take_merge_roots", &ReplicationGroup::take_merge_roots,
           "Every copy's merged statistics made through its own merge node in the forward (a parallel backward's), "
           "by copy; the group keeps none afterwards. A copy's backward task starts from them too, so that it "
           "reaches every meeting point.")
      .def(
          "abort_backward",
          [](const ReplicationGroup& self, const std::string& reason) { self.backward()->close(reason); },
          py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
          "A backward task failed: every copy waiting in the parallel backward fails.")
      .def(
          "raise_backward_failure",
          [](const ReplicationGroup& self, int64_t copy_id) { self.backward()->rethrow_failure(copy_id); },
          py::arg("copy_id"),
          "Raises the barrier error (BarrierAbortedError, BarrierTimeoutError) copy `copy_id` got in this parallel "
          "backward, if any: autograd hands the task a plain RuntimeError.")
      .def(
          "replica",
          [](const std::shared_ptr<ReplicationGroup>& self, int64_t copy_id) {
            return PyReplicaScope{self, copy_id, nullptr};
          },
          py::arg("copy_id"), "A context manager: the calling thread runs copy `copy_id` of this replication.");
}

}  // namespace syncbn::python
