#include <syncbn/callback_context.h>

#include <syncbn/replication_group.h>

#include "bindings.h"
#include "py_object_ref.h"

namespace syncbn::python {

namespace py = pybind11;

namespace {

// The garbage collector must see the Python values a context holds: a replica
// that keeps its context (self._ctx = ctx) while the context holds the replica
// (ctx.master_copy = self) is a cycle, freed only if the collector can follow it.
int traverse_context(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  if (!py::detail::is_holder_constructed(self)) return 0;
  const auto& context = py::cast<const CallbackContext&>(py::handle(self));
  int result = 0;
  // Every time alike (a collection traverses twice; values visited once only would look unreachable): the lock is
  // held only briefly, by threads that wait for nothing else (values are destroyed after it is released).
  context.for_each_value([&](const std::any& value) {
    if (result != 0) return;
    if (const PyObjectRef* ref = std::any_cast<PyObjectRef>(&value); ref && *ref && (*ref)->object) {
      result = visit((*ref)->object.ptr(), arg);
    }
  });
  return result;
}

int clear_context(PyObject* self) {
  if (!py::detail::is_holder_constructed(self)) return 0;
  auto& context = py::cast<CallbackContext&>(py::handle(self));
  context.erase_if([](const std::any& value) { return std::any_cast<PyObjectRef>(&value) != nullptr; });
  return 0;
}

}  // namespace

void bind_callback_context(py::module_& m) {
  py::class_<CallbackContext, std::shared_ptr<CallbackContext>>(
      m, "CallbackContext",
      "Storage shared by every replica of one module position: the master sets attributes "
      "(ctx.sync_master = ...), the other copies read them. Thread-safe.",
      collected_by_gc<traverse_context, clear_context>())
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
      .def("__setattr__",
           [](const py::object& self, const std::string& name, py::object value) {
             // Stored, a name of the class's own (group, position, keys...) could never be read back.
             if (py::hasattr(py::type::handle_of(self), name.c_str())) {
               throw py::attribute_error("'CallbackContext' attribute '" + name +
                                         "' belongs to the context itself and cannot be set: store your value under "
                                         "another name");
             }
             self.cast<CallbackContext&>().set(name, hold(std::move(value)));
           })
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
