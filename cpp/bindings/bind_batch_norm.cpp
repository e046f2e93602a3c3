#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <syncbn/cross_process.h>
#include <syncbn/sync_batch_norm.h>

#include "barrier_controls.h"
#include "bindings.h"
#include "without_gil.h"

namespace syncbn::python {

namespace py = pybind11;

void bind_batch_norm(py::module_& m) {
  m.attr("exchange_header_words") = py::int_(kExchangeHeaderWords);  // a cross-process row: these + 2 per channel
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
      .def_property_readonly("calls", &BatchNormChannel::calls, "The synchronized calls made through this channel.")
      .def("finish", &BatchNormChannel::finish, py::call_guard<py::gil_scoped_release>(),
           "This copy's forward returned: it sends no more statistics.")
      .def("close", &BatchNormChannel::close, py::arg("reason"), py::call_guard<py::gil_scoped_release>(),
           "Ends the replication: every copy stops waiting, and none writes anything.");

  py::class_<CallRecords, std::shared_ptr<CallRecords>>(
      m, "CallRecords",
      "A layer's recent synchronized calls alone across processes, made in a checkpointed forward: their "
      "recomputation inside backward reuses the merged statistics.")
      .def(py::init<size_t>(), py::arg("capacity") = kRecentCallsKept)
      .def("__len__", &CallRecords::size)
      .def_property_readonly("capacity", &CallRecords::capacity);

  m.def(
      "sync_batch_norm_train",
      [](const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
         const std::optional<at::Tensor>& num_batches_tracked, double exponential_average_factor, double eps,
         const std::string& eps_mode, const py::object& channel, int64_t layer, const std::string& layer_name,
         const py::object& process_group, int64_t layer_id, std::shared_ptr<CallRecords> recent_calls) {
        LayerSync sync{nullptr, layer, layer_name, nullptr, layer_id, std::move(recent_calls)};
        if (!process_group.is_none()) sync.process_group = process_group.cast<ProcessGroupPtr>();
        if (!channel.is_none()) {
          if (!py::isinstance<BatchNormChannel>(channel)) {
            throw py::type_error("channel must be the copy's BatchNormChannel, or None when alone");
          }
          sync.channel = channel.cast<std::shared_ptr<BatchNormChannel>>();
        }
        const EpsMode mode = parse_eps_mode(eps_mode);
        return without_gil([&] {  // kernels and the barrier wait run without the GIL
          return sync_batch_norm_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                       exponential_average_factor, eps, mode, sync);
        });
      },
      py::arg("input"), py::arg("weight"), py::arg("bias"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("num_batches_tracked"), py::arg("exponential_average_factor"), py::arg("eps"), py::arg("eps_mode"),
      py::arg("channel"), py::arg("layer") = -1, py::arg("layer_name") = "", py::arg("process_group") = py::none(),
      py::arg("layer_id") = -1, py::arg("recent_calls") = py::none(),
      "Training-mode BatchNorm of this replica's slice with statistics merged over every replica through `channel`, "
      "the copy's BatchNormChannel (with the layer's position and name, checked across copies), or None when "
      "alone; then across `process_group` (a torch.distributed group) when it has several ranks, the layer known "
      "there as `layer_id`. running_mean and running_var, when given, are updated from the merged statistics and "
      "num_batches_tracked counts the batch; inside backward (a checkpointed block recomputed) a replicated layer "
      "reuses the original call's statistics and writes nothing (so does a layer alone across processes, with "
      "`recent_calls`, for a call it made in a checkpointed forward).");

  // Ctrl-C while the main thread waits for other ranks in a shared-memory exchange: Python's handler runs (a
  // KeyboardInterrupt ends the wait) instead of the signal waiting for the group's timeout. Other threads (replicas,
  // autograd) cannot receive signals: they skip the GIL entirely.
  const auto main_thread =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  set_cross_process_wait_hook([main_thread] {
    if (PyThread_get_thread_ident() != main_thread) return;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  });

  m.def(
      "announce_failed_call",
      [](const py::object& process_group, int64_t layer_id, int64_t channels, const std::string& label,
         const at::Device& device) {
        const auto group = process_group.cast<ProcessGroupPtr>();
        without_gil([&] { announce_failed_call(group, layer_id, channels, label, device); });
      },
      py::arg("process_group"), py::arg("layer_id"), py::arg("channels"), py::arg("label"), py::arg("device"),
      "This rank's call of layer `layer_id` failed before its exchange: takes part in the other ranks' exchange, "
      "marked failed, so that every rank fails this call (a BarrierError naming the failed ranks); returns once told, "
      "the caller raising its own error.");
  m.def(
      "synchronized_calls",
      [](const py::object& process_group) { return synchronized_calls(process_group.cast<ProcessGroupPtr>()); },
      py::arg("process_group"), "How many synchronized calls this process has made on `process_group` so far.");
  m.def(
      "failed_synchronized_calls",
      [](const py::object& process_group) {
        return failed_synchronized_calls(process_group.cast<ProcessGroupPtr>());
      },
      py::arg("process_group"),
      "How many of this process's synchronized calls on `process_group` failed because a rank's failure was told.");
  m.def(
      "announce_failed_forward",
      [](const py::object& process_group, const at::Device& device, const std::string& label) {
        const auto group = process_group.cast<ProcessGroupPtr>();
        without_gil([&] { announce_failed_forward(group, device, label); });
      },
      py::arg("process_group"), py::arg("device"), py::arg("label"),
      "This rank's forward failed before its first synchronized call on `process_group`: takes part in the first "
      "exchange the other ranks make in that forward, marked failed, so that they fail that call too.");
  m.def(
      "set_global_ranks",
      [](const py::object& process_group, std::vector<int64_t> global_ranks) {
        set_global_ranks(process_group.cast<ProcessGroupPtr>(), std::move(global_ranks));
      },
      py::arg("process_group"), py::arg("global_ranks"),
      "Names `process_group`'s ranks in error messages by their global ranks too (global_ranks[r] for its rank r).");
  m.def(
      "cross_process_transport",
      [](const py::object& process_group) { return cross_process_transport(process_group.cast<ProcessGroupPtr>()); },
      py::arg("process_group"),
      "How synchronized layers exchange with the rest of `process_group`: 'shared memory' (every rank on this host), "
      "'process group' (the group's backend), or 'not yet' (no synchronized call on it so far).");
}

}  // namespace syncbn::python
