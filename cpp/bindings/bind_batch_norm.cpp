#include <syncbn/batch_norm.h>

#include "barrier_controls.h"
#include "bindings.h"

namespace syncbn::python {

namespace py = pybind11;

void bind_batch_norm(py::module_& m) {
  // The replication's barrier as a channel exposes it (timeout, label, abort, ...); its master callback
  // merges BatchNorm statistics natively, with no Python (and no GIL) between the replicas.
  py::class_<SyncMaster, std::shared_ptr<SyncMaster>> master(
      m, "BatchNormSyncMaster", "The barrier of a replication's synchronized BatchNorm layers.");
  def_barrier_controls(master, [](SyncMaster& self) -> SyncMaster& { return self; });

  py::class_<BatchNormChannel, std::shared_ptr<BatchNormChannel>>(
      m, "BatchNormChannel",
      "One copy's end of its replication's BatchNorm barrier, shared by all the copy's synchronized layers.")
      .def_static("of", &BatchNormChannel::of, py::arg("context"), py::arg("copy_id"),
                  py::call_guard<py::gil_scoped_release>(),
                  "Copy `copy_id`'s channel in the replication of `context` (copy 0's creates the barrier).")
      .def_property_readonly("copy_id", &BatchNormChannel::copy_id)
      .def_property_readonly("master", &BatchNormChannel::master, "The replication's BatchNormSyncMaster.")
      .def("finish", &BatchNormChannel::finish, py::call_guard<py::gil_scoped_release>(),
           "This copy's forward returned: it sends no more statistics.");

  m.def(
      "sync_batch_norm_train",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
         double exponential_average_factor, double eps, const std::string& eps_mode, const py::object& sync,
         int64_t layer, const std::string& layer_name) {
        StatisticsExchange exchange;
        if (sync.is_none()) {
          exchange = local_exchange();
        } else if (py::isinstance<BatchNormChannel>(sync)) {
          exchange = sync.cast<std::shared_ptr<BatchNormChannel>>()->exchange_for(layer, layer_name);
        } else {
          throw py::type_error("sync must be the copy's BatchNormChannel, or None when alone");
        }
        const EpsMode mode = parse_eps_mode(eps_mode);
        py::gil_scoped_release no_gil;  // kernels and the barrier wait run without the GIL
        return sync_batch_norm_train(input, weight, bias, running_mean, running_var, exponential_average_factor,
                                     eps, mode, exchange);
      },
      py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("exponential_average_factor"), py::arg("eps"), py::arg("eps_mode"), py::arg("sync"),
      py::arg("layer") = -1, py::arg("layer_name") = "",
      "Training-mode BatchNorm of this replica's slice with statistics merged over every replica through `sync`, "
      "the copy's BatchNormChannel (with the layer's position and name, checked across copies), or None when "
      "alone. running_mean and running_var, when given, are updated from the merged statistics.");
}

}  // namespace syncbn::python
