#pragma once

#include <syncbn/sync_master.h>

#include <torch/extension.h>

namespace syncbn::python {

namespace py = pybind11;

// The C++ barrier behind a Python SyncMaster or BatchNormSyncMaster (defined in bind_sync_master.cpp).
std::shared_ptr<SyncMaster> barrier_core(const py::object& barrier);

// The name of `obj`'s type, for messages.
inline std::string type_name(const py::handle& obj) {
  return py::str(py::type::handle_of(obj).attr("__qualname__")).cast<std::string>();
}

// A settable property's value of the type it takes, else a TypeError naming the property (pybind's own message
// for a setter names no function and calls the value arg1).
inline double seconds_for(const py::handle& value, const std::string& property) {
  if (PyBool_Check(value.ptr()) || !(PyFloat_Check(value.ptr()) || PyLong_Check(value.ptr()) ||
                                     py::hasattr(value, "__float__") || py::hasattr(value, "__index__"))) {
    throw py::type_error(property + " must be a number of seconds, got " + py::repr(value).cast<std::string>() +
                         " of type " + type_name(value));
  }
  return py::float_(py::reinterpret_borrow<py::object>(value)).cast<double>();
}

inline std::string text_for(const py::handle& value, const std::string& property) {
  if (!PyUnicode_Check(value.ptr())) {
    throw py::type_error(property + " must be a str, got " + py::repr(value).cast<std::string>() + " of type " +
                         type_name(value));
  }
  return value.cast<std::string>();
}

// The methods every Python-facing SyncMaster shares (the Python-callback one and
// the native BatchNorm one). `core(self)` gives the C++ barrier. Every call
// releases the GIL before it takes the barrier's lock.
template <class PyClass, class CoreOf>
void def_barrier_controls(PyClass& cls, CoreOf core) {
  using Self = typename PyClass::type;
  const std::string class_name = py::str(cls.attr("__name__"));
  cls.def(
         "register_slave",
         [core](Self& self, int64_t identifier) {
           py::gil_scoped_release no_gil;
           return core(self).register_slave(identifier);
         },
         py::arg("identifier"), "Registers copy `identifier` (> 0) and returns its SlavePipe.")
      .def(
          "reset",
          [core](Self& self) {
            py::gil_scoped_release no_gil;
            core(self).reset();
          },
          "Starts a new replication: forgets every registered slave (their pipes stop working).")
      .def(
          "abort",
          [core](Self& self, const std::string& reason) {
            py::gil_scoped_release no_gil;
            core(self).abort(reason);
          },
          py::arg("reason"), "Fails the pass in progress (or the next) for every copy with BarrierAbortedError.")
      .def(
          "close",
          [core](Self& self, const std::string& reason) {
            py::gil_scoped_release no_gil;
            core(self).close(reason);
          },
          py::arg("reason"),
          "Fails the pass in progress and every later pass of this replication with BarrierAbortedError; the next "
          "replication (reset(), or a new registration) opens the barrier again.")
      .def_property_readonly("closed",
                             [core](Self& self) {
                               py::gil_scoped_release no_gil;
                               return core(self).closed();
                             },
                             "Whether the barrier is closed (close(), or its replication's): passes fail at once.")
      .def(
          "finish",
          [core](Self& self, int64_t copy_id) {
            py::gil_scoped_release no_gil;
            core(self).finish(copy_id);
          },
          py::arg("copy_id"),
          "Copy `copy_id` sends no more messages in this replication: whoever waits for it fails at once.")
      .def_property_readonly("nr_slaves",
                             [core](Self& self) {
                               py::gil_scoped_release no_gil;
                               return core(self).nr_slaves();
                             },
                             "How many slaves (copies other than 0) are registered in this replication.")
      .def_property_readonly("slave_ids",
                             [core](Self& self) {
                               py::gil_scoped_release no_gil;
                               return core(self).slave_ids();
                             },
                             "The copy ids of the registered slaves, in order.")
      .def_property(
          "timeout",
          [core](Self& self) {
            py::gil_scoped_release no_gil;
            return core(self).timeout_seconds();
          },
          [core, timeout = class_name + ".timeout"](Self& self, const py::object& value) {
            const double seconds = seconds_for(value, timeout);
            py::gil_scoped_release no_gil;
            core(self).set_timeout_seconds(seconds);
          },
          "Seconds a pass waits for missing copies before failing.")
      .def_property(
          "label",
          [core](Self& self) {
            py::gil_scoped_release no_gil;
            return core(self).label();
          },
          [core, property = class_name + ".label"](Self& self, const py::object& value) {
            std::string label = text_for(value, property);
            py::gil_scoped_release no_gil;
            core(self).set_label(std::move(label));
          },
          "A name used in error messages, e.g. the synchronized layer.");
}

}  // namespace syncbn::python
