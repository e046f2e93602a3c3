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

// `with group.backward_run(run):` marks the calling thread as running a task of that backward run (RunScope).
struct PyRunScope {
  std::shared_ptr<ReplicaBackward> backward;
  int64_t run;
  std::unique_ptr<ReplicaBackward::RunScope> scope;
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

  py::class_<PyRunScope>(m, "BackwardRunScope",
                         "While entered, the calling thread runs a task of one parallel backward run of its "
                         "replication (see ReplicationGroup.begin_backward).")
      .def("__enter__",
           [](PyRunScope& self) -> PyRunScope& {
             if (self.scope) throw py::value_error("BackwardRunScope is already entered");
             self.scope = std::make_unique<ReplicaBackward::RunScope>(self.backward, self.run);
             return self;
           })
      .def("__exit__", [](PyRunScope& self, const py::args&) {
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
          "A CallbackContext shared by every position and copy of the replication. Python values set on it are "
          "not seen by the garbage collector through the replicas' contexts: hold a replica or a module there "
          "weakly (weakref), or it and the replication live for good.")
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
      // The ReplicaBackward calls below lock its mutex: without the GIL, so that a thread holding that mutex never
      // waits for us (freeing a tensor with a Python object takes the GIL).
      .def_property(
          "parallel_backward",
          [](const ReplicationGroup& self) {
            py::gil_scoped_release no_gil;
            return self.backward()->parallel();
          },
          [](const ReplicationGroup& self, bool parallel) {
            py::gil_scoped_release no_gil;
            self.backward()->set_parallel(parallel);
          },
          "Whether each replica's backward runs on a thread of its own (its synchronized layers then meet in "
          "backward); default False.")
      .def(
          "begin_backward", [](const ReplicationGroup& self) { return self.backward()->begin_run(); },
          py::call_guard<py::gil_scoped_release>(),
          "A parallel backward run starts; returns its id, which each of its tasks passes below and enters with "
          "backward_run: a task of an earlier run (left running after a failure or an interrupt) is refused.")
      .def(
          "backward_run",
          [](const ReplicationGroup& self, int64_t run) {
            return PyRunScope{self.backward(), run, nullptr};
          },
          py::arg("run"), "A context manager: the calling thread runs a task of parallel backward run `run`.")
      .def(
          "backward_done",
          [](const ReplicationGroup& self, int64_t copy_id, int64_t run) { self.backward()->copy_done(copy_id, run); },
          py::arg("copy_id"), py::arg("run"), py::call_guard<py::gil_scoped_release>(),
          "Copy `copy_id`'s backward task of run `run` ended: nobody waits for it any more (ignored for an earlier "
          "run).")
      .def(
          "take_merges",
          [](ReplicationGroup& self) {
            auto kept = self.take_merges();
            return std::make_pair(std::move(kept.roots), std::move(kept.anchors));
          },
          "(roots, anchors), each by copy; the group keeps none afterwards. Roots: every copy's merged statistics "
          "made through its own merge node in the forward (a parallel backward's); a copy's backward task starts "
          "from them too, so that it reaches every meeting point. Anchors: leaves those nodes lead to where the "
          "copy's statistics have no graph; its task asks their gradients too, so that it runs those merges.")
      .def(
          "abort_backward",
          [](const ReplicationGroup& self, const std::string& reason, int64_t run) {
            self.backward()->close(reason, run);
          },
          py::arg("reason"), py::arg("run"), py::call_guard<py::gil_scoped_release>(),
          "A backward task of run `run` failed: every copy waiting in that parallel backward fails (ignored for an "
          "earlier run).")
      .def(
          "raise_backward_failure",
          [](const ReplicationGroup& self, int64_t copy_id, int64_t run) {
            std::exception_ptr failure;
            {
              py::gil_scoped_release no_gil;
              failure = self.backward()->failure(copy_id, run);
            }
            if (failure) std::rethrow_exception(failure);  // converted to its Python type with the GIL held
          },
          py::arg("copy_id"), py::arg("run"),
          "Raises the barrier error (BarrierAbortedError, BarrierTimeoutError) copy `copy_id` got in parallel "
          "backward run `run`, if any: autograd hands the task a plain RuntimeError.")
      .def(
          "replica",
          [](const std::shared_ptr<ReplicationGroup>& self, int64_t copy_id) {
            return PyReplicaScope{self, copy_id, nullptr};
          },
          py::arg("copy_id"), "A context manager: the calling thread runs copy `copy_id` of this replication.");
}

}  // namespace syncbn::python
