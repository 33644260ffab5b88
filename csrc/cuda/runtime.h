// CUDA runtime queries usable from the bindings whether or not CUDA was compiled in.
#pragma once
#include <string>

namespace dovetail::cuda {

bool compiled();          // true when the CUDA sources were built into _core
int device_count();       // 0 when no driver / no device (never throws)
std::string device_name(int index);  // throws ValueError when the index is invalid

}  // namespace dovetail::cuda
