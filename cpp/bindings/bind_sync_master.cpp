#include <syncbn/future_result.h>
#include <syncbn/sync_master.h>

#include "barrier_controls.h"
#include "bindings.h"
#include "py_object_ref.h"
#include "without_gil.h"

namespace syncbn::python {

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

// Python messages travel as an opaque payload; the core never looks inside.
Message to_message(py::object obj) {
  Message message;
  message.payload = hold(std::move(obj));
  return message;
}

// Call with the GIL held.
py::object from_message(Message message) {
  if (message.payload) return std::static_pointer_cast<PyObjectHolder>(message.payload)->object;
  // A message made by C++ code: hand Python its tensors and integers.
  return py::make_tuple(py::cast(message.tensors), py::cast(message.ints));
}

// The Python SyncMaster: the core barrier plus the Python callback it was made
// with (kept for pickling, as the established library does). Only this object
// owns the callback, and the garbage collector sees it: a module that owns its
// SyncMaster(self._reduce) is a cycle (module, master, bound method, module),
// which must be freed like the established library's pure-Python one. The core
// barrier, which may outlive this object, reaches the callback weakly.
struct PySyncMaster {
  PySyncMaster(py::object master_callback, std::optional<double> timeout)
      : callback(hold(checked_callable(std::move(master_callback)))),
        core(std::make_shared<SyncMaster>(wrap_callback(callback), timeout)) {}

  // Refused when made, not at the first pass ("'NoneType' object is not callable", naming nothing).
  static py::object checked_callable(py::object callback) {
    if (!PyCallable_Check(callback.ptr())) {
      throw py::type_error("SyncMaster: master_callback must be callable (it merges the copies' messages), got " +
                           std::string(py::repr(callback)));
    }
    return callback;
  }

  ~PySyncMaster() {
    // The core takes the barrier's lock; never wait for it holding the GIL.
    py::gil_scoped_release no_gil;
    core.reset();
  }

  static MasterCallback wrap_callback(const PyObjectRef& held_callback) {
    return [weak_callback = std::weak_ptr<PyObjectHolder>(held_callback)](MessageList messages) {
      py::gil_scoped_acquire gil;
      const PyObjectRef callback = weak_callback.lock();
      if (!callback || !callback->object) {
        throw BarrierError("the SyncMaster's master callback is gone (the SyncMaster was freed)");
      }
      try {
        py::list intermediates;
        for (auto& entry : messages) {
          intermediates.append(py::make_tuple(entry.first, from_message(std::move(entry.second))));
        }
        py::object returned = callback->object(intermediates);
        if (!py::isinstance<py::iterable>(returned)) {  // else "'NoneType' object is not iterable", naming nothing
          throw py::type_error("the master callback must return (copy_id, result) pairs, in a list, got " +
                               (returned.is_none() ? std::string("None (a missing return statement?)")
                                                   : "an object of type " + type_name(returned)));
        }
        MessageList results;
        for (const py::handle item : py::iter(returned)) {
          if (!py::isinstance<py::tuple>(item) && !py::isinstance<py::list>(item)) {
            throw py::type_error("the master callback must return (copy_id, result) pairs, got an item of type " +
                                 type_name(item));
          }
          py::sequence pair = py::reinterpret_borrow<py::sequence>(item);
          if (pair.size() != 2) {
            throw py::value_error("the master callback must return (copy_id, result) pairs, got an item of length " +
                                  std::to_string(pair.size()));
          }
          py::object copy_id = pair[0];
          // An int, not a bool or a float that happens to be whole: the ids the callback received.
          if (!py::isinstance<py::int_>(copy_id) || py::isinstance<py::bool_>(copy_id)) {
            throw py::type_error("the master callback must return (copy_id, result) pairs with the int copy ids it "
                                 "received, got copy id " +
                                 py::repr(copy_id).cast<std::string>() + " of type " + type_name(copy_id));
          }
          results.emplace_back(copy_id.cast<int64_t>(), to_message(pair[1]));
        }
        return results;
      } catch (py::error_already_set& error) {
        throw PythonCallbackError(error);  // raised again in every copy that waited on this pass
      }
    };
  }

  // The master callback (None once the garbage collector cleared it).
  py::object master_callback() const { return callback->object ? callback->object : py::none(); }

  PyObjectRef callback;
  std::shared_ptr<SyncMaster> core;
};

int traverse_sync_master(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(Py_TYPE(self));
  if (!py::detail::is_holder_constructed(self)) return 0;
  const auto& master = py::cast<const PySyncMaster&>(py::handle(self));
  if (master.callback && master.callback->object) Py_VISIT(master.callback->object.ptr());
  return 0;
}

int clear_sync_master(PyObject* self) {
  if (!py::detail::is_holder_constructed(self)) return 0;
  auto& master = py::cast<PySyncMaster&>(py::handle(self));
  if (master.callback) master.callback->object = py::object();
  return 0;
}

}  // namespace

std::shared_ptr<SyncMaster> barrier_core(const py::object& barrier) {
  if (py::isinstance<PySyncMaster>(barrier)) return barrier.cast<PySyncMaster&>().core;
  if (py::isinstance<SyncMaster>(barrier)) return barrier.cast<std::shared_ptr<SyncMaster>>();
  throw py::type_error("expected a SyncMaster or a BatchNormSyncMaster, got " +
                       py::str(py::type::handle_of(barrier)).cast<std::string>());
}

void bind_sync_master(py::module_& m) {
  m.def("default_timeout_seconds", &default_timeout_seconds,
        "The barrier timeout used when none is given: $SYNCBN_TIMEOUT (seconds), or 300 where it is unset, empty "
        "or blank. Raises ValueError where it is set to something that is not a positive number.");

  py::class_<SlavePipe, std::shared_ptr<SlavePipe>>(
      m, "SlavePipe", "A slave's end of a SyncMaster, made by its register_slave(copy_id) (not constructed directly).")
      .def(
          "run_slave",
          [](SlavePipe& self, py::object msg) {
            Message message = to_message(std::move(msg));
            Message result = without_gil([&] { return self.run_slave(std::move(message)); });
            return from_message(std::move(result));
          },
          py::arg("msg"), "Sends this copy's message and waits for its result (the GIL is released meanwhile).")
      .def_property_readonly("identifier", &SlavePipe::copy_id,
                             "The copy id this pipe sends for (the established library's name for copy_id).")
      .def_property_readonly("copy_id", &SlavePipe::copy_id, "The copy id this pipe sends for.")
      .def("__repr__", [](const SlavePipe& self) { return "SlavePipe(identifier=" + std::to_string(self.copy_id()) + ")"; });

  py::class_<PySyncMaster> sync_master(m, "SyncMaster",
                                       "The master/slave reduction barrier. master_callback receives [(copy_id, msg), "
                                       "...], the master's (0, msg) first, and returns [(copy_id, result), ...], the "
                                       "master's first. timeout: seconds a pass waits for missing copies; default "
                                       "default_timeout_seconds() ($SYNCBN_TIMEOUT or 300), read at construction.",
                                       collected_by_gc<traverse_sync_master, clear_sync_master>());
  sync_master
      .def(py::init<py::object, std::optional<double>>(), py::arg("master_callback"), py::arg("timeout") = py::none())
      .def(
          "run_master",
          [](PySyncMaster& self, py::object master_msg) {
            Message message = to_message(std::move(master_msg));
            Message result = without_gil([&] { return self.core->run_master(std::move(message)); });
            return from_message(std::move(result));
          },
          py::arg("master_msg"), "Collects every copy's message, runs the master callback, returns the master's result.")
      .def_property_readonly("master_callback", &PySyncMaster::master_callback,
                             "The callable merging the copies' messages (given at construction).")
      .def(py::pickle(
          [](const PySyncMaster& self) {
            return py::dict("master_callback"_a = self.master_callback(), "timeout"_a = self.core->timeout_seconds(),
                            "label"_a = self.core->label());
          },
          [](const py::dict& state) {
            // The established library's SyncMaster pickled its callback only: the defaults then (a model of
            // its layers' own saved whole, loaded with this package in its place).
            std::optional<double> timeout;
            if (state.contains("timeout")) timeout = state["timeout"].cast<double>();
            auto master = std::make_unique<PySyncMaster>(state["master_callback"], timeout);
            if (state.contains("label")) master->core->set_label(state["label"].cast<std::string>());
            return master;
          }));
  def_barrier_controls(sync_master, [](PySyncMaster& self) -> SyncMaster& { return *self.core; });

  py::class_<FutureResult, std::shared_ptr<FutureResult>>(m, "FutureResult",
                                                          "A one-slot result hand-off between two threads.")
      .def(py::init<>())
      .def(
          "put",
          [](FutureResult& self, py::object result) {
            Message message = to_message(std::move(result));
            without_gil([&] { self.put(std::move(message)); });
          },
          py::arg("result"), "Hands over a result (an error if the previous one was not taken yet); a waiting get() wakes.")
      .def(
          "get",
          [](FutureResult& self, std::optional<double> timeout) {
            Message result = without_gil([&] { return self.get(timeout); });
            return from_message(std::move(result));
          },
          py::arg("timeout") = py::none(),
          "Waits for the result (the GIL is released meanwhile) and takes it; raises BarrierTimeoutError where "
          "none arrives within `timeout` seconds (default: wait for ever).")
      .def("ready", &FutureResult::ready, "Whether a result was put and not taken yet.");
}

}  // namespace syncbn::python
