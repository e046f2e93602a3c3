#include <syncbn/callback_context.h>

#include <syncbn/replication_group.h>

#include "bindings.h"
#include "py_object_ref.h"

namespace syncbn::python {

namespace py = pybind11;

void bind_callback_context(py::module_& m) {
  py::class_<CallbackContext, std::shared_ptr<CallbackContext>>(
      m, "CallbackContext",
      "Storage shared by every replica of one module position: the master sets attributes "
      "(ctx.sync_master = ...), the other copies read them. Thread-safe.")
      .def(py::init<>())
      .def("__getattr__",
           [](const CallbackContext& self, const std::string& name) -> py::object {
             std::optional<std::any> value = self.get_any(name);
             if (!value.has_value()) {
               throw py::attribute_error("'CallbackContext' object has no attribute '" + name + "'");
             }
             if (const PyObjectRef* ref = std::any_cast<PyObjectRef>(&*value)) return (*ref)->object;
             throw py::type_error("CallbackContext attribute '" + name + "' holds a C++ value of type " +
                                  c10::demangle(value->type().name()) + ", which Python cannot read");
           })
      .def("__setattr__", [](CallbackContext& self, const std::string& name,
                             py::object value) { self.set(name, hold(std::move(value))); })
      .def("__delattr__",
           [](CallbackContext& self, const std::string& name) {
             if (!self.erase(name)) {
               throw py::attribute_error("'CallbackContext' object has no attribute '" + name + "'");
             }
           })
      .def("__contains__", &CallbackContext::contains)
      .def("__len__", &CallbackContext::size)
      .def("keys", &CallbackContext::keys, "The attribute names set on this context, sorted.")
      .def_property_readonly("position", &CallbackContext::position,
                             "This module's position in modules() order (-1 for a context made by hand).")
      .def_property_readonly("module_name", &CallbackContext::name,
                             "This module's path in the replica ('' for the root).")
      .def_property_readonly("group", &CallbackContext::group,
                             "The ReplicationGroup shared by every context of the replication (None for a context "
                             "made by hand).")
      .def("__repr__", [](const CallbackContext& self) {
        std::string out = "CallbackContext(";
        const auto keys = self.keys();
        for (size_t i = 0; i < keys.size(); ++i) out += (i ? ", " : "") + keys[i];
        return out + ")";
      });
}

}  // namespace syncbn::python
