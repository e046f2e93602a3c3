#pragma once

// Symbol visibility for the syncbn shared library. The library is built with
// default visibility on ELF, so this only matters on platforms that export
// nothing by default.
#if defined(_WIN32)
#if defined(SYNCBN_BUILDING_LIBRARY)
#define SYNCBN_API __declspec(dllexport)
#else
#define SYNCBN_API __declspec(dllimport)
#endif
#else
#define SYNCBN_API __attribute__((visibility("default")))
#endif
