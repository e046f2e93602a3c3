#include <syncbn/replicate.h>

#include <tuple>
#include <vector>

#include "bindings.h"
#include "py_object_ref.h"

namespace syncbn::python {

namespace py = pybind11;

namespace {

std::string qualified_type_name(const py::handle& obj) {
  py::handle type = py::type::handle_of(obj);
  return py::str(type.attr("__module__")).cast<std::string>() + "." +
         py::str(type.attr("__qualname__")).cast<std::string>();
}

}  // namespace

void bind_replicate(py::module_& m) {
  m.def(
      "execute_replication_callbacks",
      [](const py::sequence& replicas) {
        // Runs with the GIL held throughout: the hooks are Python.
        std::vector<std::vector<ReplicaModule>> views;
        views.reserve(replicas.size());
        for (const py::handle replica : replicas) {
          std::vector<ReplicaModule> view;
          for (const py::handle item : py::iter(replica.attr("named_modules")())) {
            const py::tuple named = py::reinterpret_borrow<py::tuple>(item);
            const py::handle module = named[1];
            ReplicaModule entry{qualified_type_name(module), {}, named[0].cast<std::string>()};
            py::object hook = py::getattr(module, "__data_parallel_replicate__", py::none());
            if (!hook.is_none()) {
              entry.on_replicate = [ref = hold(std::move(hook))](const std::shared_ptr<CallbackContext>& context,
                                                                 int64_t copy_id) { ref->object(context, copy_id); };
            }
            view.push_back(std::move(entry));
          }
          views.push_back(std::move(view));
        }
        return execute_replication_callbacks(views);
      },
      py::arg("modules"),
      "Calls __data_parallel_replicate__(ctx, copy_id) on every module of every replica that has it: one "
      "shared CallbackContext per module position, the master (copy 0) first at every position. Raises "
      "ValueError when the replicas' module trees differ. Returns the contexts, one per position; they share "
      "one ReplicationGroup (ctx.group).");
  m.def(
      "parameter_aliases",
      [](const std::vector<at::Tensor>& parameters) {
        std::vector<at::Tensor> aliases;
        aliases.reserve(parameters.size());
        for (const auto& parameter : parameters) aliases.push_back(parameter_alias(parameter));
        return aliases;
      },
      py::arg("parameters"),
      "A replica's handles on parameters: the same data, each gradient handed to its parameter's through a node "
      "autograd runs as soon as that gradient is complete (as AccumulateGrad), not at the end of the backward.");
  m.def(
      "write_back_buffers",
      [](const std::vector<std::tuple<at::Tensor, at::Tensor, std::optional<int64_t>, std::optional<int64_t>>>&
             buffers) {
        std::vector<BufferCopy> copies;
        copies.reserve(buffers.size());
        for (const auto& [original, copy, original_version, copy_version] : buffers) {
          copies.push_back({original, copy, original_version, copy_version});
        }
        write_back_buffers(copies);
      },
      py::arg("buffers"),
      "Given (original, copy, original's version, copy's version) per buffer, the versions when the copy was made "
      "(None for an inference tensor): copies into each original the copy a replica changed "
      "(syncbn::write_back_buffers).");
  m.def("version_of", &version_of, py::arg("tensor"),
        "A tensor's version counter, or None for an inference tensor (syncbn::version_of).");
}

}  // namespace syncbn::python
