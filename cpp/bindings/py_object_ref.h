#pragma once

#include <exception>
#include <memory>
#include <string>
#include <utility>

#include <torch/extension.h>

namespace syncbn::python {

namespace py = pybind11;

inline bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Owns a Python object on behalf of C++ state that may be copied or destroyed
// on a thread without the GIL (the barrier, a context): copies share the holder
// (an atomic shared_ptr count), and the last owner takes the GIL to drop it.
struct __attribute__((visibility("hidden"))) PyObjectHolder {
  explicit PyObjectHolder(py::object obj) : object(std::move(obj)) {}
  PyObjectHolder(const PyObjectHolder&) = delete;
  PyObjectHolder& operator=(const PyObjectHolder&) = delete;
  ~PyObjectHolder() {
    if (!object) return;
    if (!Py_IsInitialized() || interpreter_finalizing()) {
      // The interpreter is gone or going: nothing left to decref into, and a thread other than the finalizing
      // one that asked for the GIL now would be ended (pthread_exit) inside this destructor, aborting the process.
      object.release();
      return;
    }
    py::gil_scoped_acquire gil;
    object = py::object();
  }
  py::object object;
};

using PyObjectRef = std::shared_ptr<PyObjectHolder>;

// Call with the GIL held.
inline PyObjectRef hold(py::object obj) { return std::make_shared<PyObjectHolder>(std::move(obj)); }

// A class option for py::class_: instances take part in the garbage collector, through `traverse` (visits each
// Python object the instance owns, once) and `clear` (drops them), so that cycles through C++ state are freed.
template <traverseproc Traverse, inquiry Clear>
py::custom_type_setup collected_by_gc() {
  return py::custom_type_setup([](PyHeapTypeObject* heap_type) {
    PyTypeObject* type = &heap_type->ht_type;
    type->tp_flags |= Py_TPFLAGS_HAVE_GC;
    type->tp_traverse = Traverse;
    type->tp_clear = Clear;
  });
}

// A Python exception raised in a Python callback that C++ code called, carried
// through C++ (the barrier hands it to every waiting copy). Unlike
// py::error_already_set it can be raised again any number of times: bind_errors'
// translator raises a copy of the original each time, with its traceback.
class __attribute__((visibility("hidden"))) PythonCallbackError : public std::exception {
 public:
  // Call with the GIL held, inside the catch of the error_already_set.
  explicit PythonCallbackError(py::error_already_set& error)
      : exception_(hold(error.value())), what_(error.what()) {}
  const char* what() const noexcept override { return what_.c_str(); }
  const py::object& exception() const { return exception_->object; }

 private:
  PyObjectRef exception_;
  std::string what_;
};

}  // namespace syncbn::python
