// Errors raised by the native core. Native code never aborts on bad input: it throws one
// of these and the bindings translate them (ValueError / IndexError / RuntimeError).
#pragma once
#include <stdexcept>
#include <string>

namespace dovetail {

struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct IndexError : std::out_of_range {
  using std::out_of_range::out_of_range;
};

[[noreturn]] void throw_value_error(const std::string& msg);
[[noreturn]] void throw_index_error(const std::string& msg);

}  // namespace dovetail

#define DT_CHECK(cond, msg)                                                   \
  do {                                                                        \
    if (!(cond)) ::dovetail::throw_value_error(std::string() + msg);          \
  } while (0)
#define DT_CHECK_INDEX(cond, msg)                                             \
  do {                                                                        \
    if (!(cond)) ::dovetail::throw_index_error(std::string() + msg);          \
  } while (0)
