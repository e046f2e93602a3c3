#include <syncbn/barrier_benchmark.h>
#include <syncbn/version.h>

#include "bindings.h"

namespace syncbn::python {

namespace py = pybind11;

void bind_version(py::module_& m) {
  m.def("version", &syncbn::version, "The syncbn core library version.");
  m.def("compiler_version", &syncbn::compiler_version, "The compiler the core library was built with.");
  m.def("measure_barrier_round_trip_us", &syncbn::measure_barrier_round_trip_us, py::arg("replicas"),
        py::arg("passes"), py::arg("warmup") = 50, py::call_guard<py::gil_scoped_release>(),
        "Median round trip (microseconds) of the C++ barrier driven by C++ std::threads, one per replica.");
}

}  // namespace syncbn::python
