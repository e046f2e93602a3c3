#include <syncbn/replication_group.h>

#include "barrier_controls.h"
#include "bindings.h"

namespace syncbn::python {

namespace py = pybind11;

void bind_replication_group(py::module_& m) {
  py::class_<ReplicationGroup, std::shared_ptr<ReplicationGroup>>(
      m, "ReplicationGroup",
      "What one replication shares: storage, and the barriers told when a copy's forward returns or fails.")
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
          py::arg("barrier"), "A SyncMaster (or BatchNormSyncMaster) the replicas use: copy_finished/abort reach it.")
      .def("copy_finished", &ReplicationGroup::copy_finished, py::arg("copy_id"),
           py::call_guard<py::gil_scoped_release>(), "Copy `copy_id`'s forward returned: it sends no more messages.")
      .def("abort", &ReplicationGroup::abort, py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
           "Wakes everyone waiting on the replication's barriers with BarrierAbortedError.");
}

}  // namespace syncbn::python
