#include "common/error.h"

namespace dovetail {

void throw_value_error(const std::string& msg) { throw ValueError(msg); }
void throw_index_error(const std::string& msg) { throw IndexError(msg); }

}  // namespace dovetail
